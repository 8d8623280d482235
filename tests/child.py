"""Starting the command line as a child process that can be interrupted like one a user started."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any


def _default_signals() -> None:
    # A shell's background job (`nohup ... &`, `cmd &` without job control) starts with SIGINT ignored, and
    # children inherit that: Ctrl-C would then never reach the merge. A user's terminal has the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_cli(args: list[str], **popen: Any) -> subprocess.Popen:
    """``python -m hf_model_stock.cli ARGS`` with SIGINT and SIGTERM at their defaults, whatever this
    process inherited."""
    return subprocess.Popen([sys.executable, "-m", "hf_model_stock.cli", *args], preexec_fn=_default_signals, **popen)
