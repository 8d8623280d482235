"""``hf-model-stock demo`` and ``demo --study``: is the merge worth it? The paper's experiment, small and real.

- ``demo``: the quick demo (three GSM8K fine-tunes, a Model Stock merge, held-out scores); the base model
- ``data``: GSM8K split into a training part and a held-out part; the prompt format; evaluation files
- ``finetune``: seeded fine-tuning (the seed only sets the data order)
- ``experiment``: fine-tunes, merge recipes and a leaderboard spec, the leaderboard run, ``inspect``
- ``report``: ``study/README.md``, written from the numbers
"""
