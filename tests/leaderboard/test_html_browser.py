"""``leaderboard.html`` in a real headless browser (Debian's ``chromium``; CI installs it with apt): the
DOM it builds has every row, and a screenshot shows the embedded chart (its bar colours), not a blank
page. Skipped only where no Chromium binary exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hf_model_stock.leaderboard.batch import write_outputs
from hf_model_stock.leaderboard.board import Leaderboard, Row
from hf_model_stock.leaderboard.store import TaskResult

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
NAMES = ["base", "ft-1", "ft-2", "ft-3", "soup-2", "soup-3", "stock-2", "stock-3"]


def browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def headless(binary: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def result(task: str, value: float, normalised: float, higher: bool, stderr: float | None = None) -> TaskResult:
    score = {"task": task, "lm_eval_task": task, "metric": "m", "value": value, "stderr": stderr, "n": 40,
             "normalised": normalised, "higher_is_better": higher, "data": "test.jsonl"}
    return TaskResult(task=task, task_key="k", identity=f"sha256:{task}", scores=[score], created="", run_dir="",
                      notes=[])


@pytest.fixture()
def page(tmp_path: Path) -> Path:
    rows = []
    for i, name in enumerate(NAMES):
        acc = 0.2 + 0.05 * i
        row = Row(name, ["model"], f"/models/{name}", identity=f"sha256:{i:064x}")
        row.results = {"gsm8k_answer": result("gsm8k_answer", acc, 100 * acc, True, 0.05),
                       "gsm8k_nll": result("gsm8k_nll", 1.2 - 0.01 * i, 1.2 - 0.01 * i, False, 0.0123)}
        rows.append(row)
    board = Leaderboard("Browser check", ["gsm8k_answer", "gsm8k_nll"], rows, {"limit": None}, "2026-01-01T00:00:00")
    return write_outputs(board, tmp_path / "board")["html"]


def test_leaderboard_html_renders_in_a_headless_browser(page: Path, tmp_path: Path) -> None:
    binary = browser()
    if binary is None:
        pytest.skip("no Chromium binary (apt-get install chromium)")
    dom = headless(binary, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<table>" in html and 'src="data:image/png;base64,' in html
    for name in NAMES:
        assert f"<td>{name}</td>" in html, name
    assert "gsm8k_nll (nats/token, not normalised, lower is better)" in html
    assert "<td>20.00 ± 5.00</td>" in html and "<td>1.2000 ± 0.0123</td>" in html  # standard errors shown

    shot = tmp_path / "shot.png"
    run = headless(binary, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(str(shot))[..., :3]  # floats in [0, 1]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert len({tuple(p) for p in pixels.reshape(-1, 3)[::7].round(2).tolist()}) > 20  # not one colour
    # the chart's bars: matplotlib's first colour (tab:blue, 31/119/180) and the NLL panel's tab:purple
    for rgb in ((31, 119, 180), (148, 103, 189)):
        target = [c / 255 for c in rgb]
        close = (abs(pixels - target) < 0.03).all(axis=-1)
        assert close.sum() > 500, f"no {rgb} bars in the screenshot"


def test_a_raw_lower_is_better_metric_alone(tmp_path: Path) -> None:
    """Only unit metrics (the study's two NLLs): no normalised table, no average column, no empty
    column; each score with its standard error, 4 decimals; one chart panel each."""
    rows = []
    for i, name in enumerate(["a", "b"]):
        row = Row(name, ["model"], f"/models/{name}", identity=f"sha256:{i:064x}")
        row.results = {"gsm8k_nll": result("gsm8k_nll", 1.23456 - i / 100, 1.23456 - i / 100, False, 0.01234),
                       "pydoc_nll": result("pydoc_nll", 2.5 + i / 10, 2.5 + i / 10, False, None if i else 0.02)}
        rows.append(row)
    board = Leaderboard("NLL only", ["gsm8k_nll", "pydoc_nll"], rows, {}, "2026-01-01T00:00:00")
    files = write_outputs(board, tmp_path / "board")
    md = files["md"].read_text(encoding="utf-8")
    assert "| a | 1.2346 ± 0.0123 (n=40) | 2.5000 ± 0.0200 (n=40) |" in md
    assert "| b | 1.2246 ± 0.0123 (n=40) | 2.6000 (n=40) |" in md  # spec order; no stderr: none shown
    assert "Normalised" not in md and "average |" not in md and "| — |" not in md
    assert "Raw scores only: gsm8k_nll (nats/token, lower is better), pydoc_nll (nats/token, lower is better)" in md
    page = files["html"].read_text(encoding="utf-8")
    assert "Normalised" not in page and "<th>average</th>" not in page
    assert "<td>1.2346 ± 0.0123 (n=40)</td>" in page
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
