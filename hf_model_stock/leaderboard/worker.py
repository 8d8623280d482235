"""Child process of the local executor: ``python -m hf_model_stock.leaderboard.worker DIR`` runs the
pickled ``(evaluate, job)`` in ``DIR/job.pkl`` and writes the ``Outcome`` to ``DIR/outcome.pkl``
(atomically: a process that dies mid-way leaves no outcome, which the parent reports as a crash)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

from hf_model_stock.leaderboard.executors import run_logged


def main(workdir: Path) -> int:
    with (workdir / "job.pkl").open("rb") as fh:
        evaluate, job = pickle.load(fh)
    outcome = run_logged(evaluate, job)
    tmp = workdir / "outcome.pkl.tmp"
    with tmp.open("wb") as fh:
        pickle.dump(outcome, fh)
    os.replace(tmp, workdir / "outcome.pkl")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
