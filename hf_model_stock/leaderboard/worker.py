"""Child process of the local executor: ``python -m hf_model_stock.leaderboard.worker DIR`` runs the
pickled ``(evaluate, job)`` in ``DIR/job.pkl`` and writes the ``Outcome`` to ``DIR/outcome.pkl``
(atomically: a process that dies mid-way leaves no outcome, which the parent reports as a crash)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from hf_model_stock.leaderboard.executors import run_logged
from hf_model_stock.leaderboard.store import write_atomically


def main(workdir: Path) -> int:
    with (workdir / "job.pkl").open("rb") as fh:
        evaluate, job = pickle.load(fh)
    outcome = pickle.dumps(run_logged(evaluate, job))
    write_atomically(workdir / "outcome.pkl", lambda tmp: tmp.write_bytes(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
