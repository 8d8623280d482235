"""``hf-model-stock demo --study``: is the merge worth it? The paper's experiment, small and real.

- ``data``: GSM8K split into a training part and a held-out part; the prompt format; evaluation files
- ``finetune``: seeded fine-tuning (the seed only sets the data order)
- ``runner``: fine-tunes, merge recipes and a leaderboard spec, the leaderboard run, ``inspect``
- ``report``: ``study/README.md``, written from the numbers
"""
