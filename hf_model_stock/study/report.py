"""The study's ``README.md``: the setup, the table (from the leaderboard), paired differences (from
lm-eval's per-item records), the fine-tunes' geometry (from ``inspect``) and what the numbers show.
Every sentence that states a result is chosen by comparing the numbers, not written in advance."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hf_model_stock.study.data import packaged_gsm8k

if TYPE_CHECKING:
    from hf_model_stock.analysis.inspect import InspectReport
    from hf_model_stock.leaderboard.board import Leaderboard
    from hf_model_stock.study.runner import StudyResult

NLL = "gsm8k_nll"
EXTRA_HEADS = {"gsm8k_answer": "answer, teacher-forced", "gsm8k": "GSM8K exact match (5-shot, strict)"}
NLL_SAMPLES = "samples_hfms_gsm8k_nll_*.jsonl"  # lm-eval's per-sample file (EvaluationTracker layout)


@dataclass(frozen=True)
class Paired:
    """NLL/token of A minus that of B over the same items (token-weighted), with its standard error."""

    a: str
    b: str
    diff: float
    stderr: float
    n: int

    def describe(self) -> str:
        verdict = "lower" if self.diff < 0 else "higher"
        sig = abs(self.diff) > 2 * self.stderr
        return (f"{self.a} vs {self.b}: {self.diff:+.4f} ± {self.stderr:.4f} nats/token ({verdict} for {self.a}; "
                f"{'more' if sig else 'less'} than 2 standard errors, {self.n} items)")


def item_nll(board: Leaderboard, name: str) -> dict[int, tuple[float, int]]:
    """Per held-out item: (summed log-likelihood of the gold solution, its tokens), from the row's
    lm-eval sample file."""
    row = next(r for r in board.rows if r.name == name)
    run_dir = Path(row.results[NLL].run_dir)
    (path,) = list(run_dir.glob(f"*/lm_eval/**/{NLL_SAMPLES}"))
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        ll, n = record["nll_per_token"]
        out[int(record["doc_id"])] = (float(ll), int(n))
    return out


def paired(board: Leaderboard, a: str, b: str) -> Paired:
    """Token-weighted difference of NLL/token (A - B) over the items both were scored on, with the
    ratio estimator's standard error (items as the sampling unit)."""
    xa, xb = item_nll(board, a), item_nll(board, b)
    ids = sorted(set(xa) & set(xb))
    d = [(-xa[i][0]) - (-xb[i][0]) for i in ids]
    n = [xa[i][1] for i in ids]
    total = sum(n)
    diff = sum(d) / total
    m = len(ids)
    var = sum((dj - diff * nj) ** 2 for dj, nj in zip(d, n)) / (m - 1) if m > 1 else float("nan")
    return Paired(a, b, diff, math.sqrt(var * m) / total if m > 1 else float("nan"), m)


@dataclass(frozen=True)
class Geometry:
    """The fine-tunes' deltas per layer: the spread of their norms and of their pairwise angles."""

    layers: int
    norm_spread_max: float  # max over layers of (max - min) / mean of the deltas' norms
    norm_spread_median: float
    angle_min: float  # over every layer and pair
    angle_max: float
    angle_spread_max: float  # max over layers of (max - min) of the pairwise angles
    whole_angles: list[float]  # pairwise angles of the whole-model deltas
    whole_norms: list[float]


def geometry(report: InspectReport) -> Geometry:
    """Summarise ``inspect``'s per-layer rows (the whole model: the layers' Grams added up)."""
    spreads, angles, angle_spreads = [], [], []
    n = len(report.models)
    gram = [[0.0] * n for _ in range(n)]
    for row in report.layers:
        norms = row.stats.norms
        mean = sum(norms) / len(norms)
        if mean > 0:
            spreads.append((max(norms) - min(norms)) / mean)
        defined = [a for a in row.stats.angles if a is not None]
        angles += defined
        if defined:
            angle_spreads.append(max(defined) - min(defined))
        for i in range(n):
            gram[i][i] += norms[i] ** 2
        for (i, j), cos in zip(report.pairs, row.stats.pair_cos):
            if cos is not None:
                gram[i][j] += cos * norms[i] * norms[j]
    whole_norms = [math.sqrt(gram[i][i]) for i in range(n)]
    whole_angles = [math.degrees(math.acos(max(-1.0, min(1.0, gram[i][j] / (whole_norms[i] * whole_norms[j])))))
                    for i, j in report.pairs if whole_norms[i] * whole_norms[j] > 0]
    spreads.sort()
    return Geometry(layers=len(report.layers), norm_spread_max=max(spreads, default=float("nan")),
                    norm_spread_median=spreads[len(spreads) // 2] if spreads else float("nan"),
                    angle_min=min(angles, default=float("nan")), angle_max=max(angles, default=float("nan")),
                    angle_spread_max=max(angle_spreads, default=float("nan")),
                    whole_angles=whole_angles, whole_norms=whole_norms)


def _value(board: Leaderboard, name: str, task: str) -> float | None:
    row = next((r for r in board.rows if r.name == name), None)
    score = row.score(task) if row else None
    return None if score is None else float(score["value"])


def result_table(result: StudyResult) -> list[str]:
    """The Markdown table: one row per model in study order; NLL, then any exact-match task."""
    board = result.board
    base_nll = _value(board, "base", NLL)
    extra = [t for t in board.tasks if t != NLL]
    head = ["model", "what", "NLL/token ↓", "vs base", *[f"{EXTRA_HEADS.get(t, t)} ↑" for t in extra], "mean t"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in board.rows:
        nll = _value(board, row.name, NLL)
        what = describe_row(row.name, result.settings.seeds())
        cells = [row.name, what, "—" if nll is None else f"{nll:.4f}",
                 "—" if nll is None or base_nll is None or row.name == "base" else f"{nll - base_nll:+.4f}"]
        for task in extra:
            value, score = _value(board, row.name, task), row.score(task)
            cells.append("—" if value is None or score is None else
                         f"{value:.3f} ({round(value * score['n'])}/{score['n']})")
        cells.append(f"{result.merge_t[row.name]:.3f}" if row.name in result.merge_t else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def describe_row(name: str, seeds: list[int]) -> str:
    if name == "base":
        return "the base, before fine-tuning"
    kind, _, k = name.partition("-")
    if kind == "ft":
        return f"fine-tune, seed {seeds[int(k) - 1]}"
    members = ", ".join(f"ft-{i}" for i in range(1, int(k) + 1))
    return f"uniform average of {members}" if kind == "soup" else f"Model Stock of {members}"


def findings(result: StudyResult, geo: Geometry) -> list[str]:
    """What the numbers show, sentence by sentence, each chosen by a comparison."""
    board = result.board
    n = result.settings.n_models
    nll = {row.name: _value(board, row.name, NLL) for row in board.rows}
    fts = [f"ft-{i}" for i in range(1, n + 1)]
    best_ft = min(fts, key=lambda x: nll[x])
    worst_ft = max(fts, key=lambda x: nll[x])
    out = []
    base = nll["base"]
    moved = all(nll[f] < base for f in fts)
    out.append(f"- Fine-tuning {'lowers' if moved else 'does not consistently lower'} the held-out NLL: base "
               f"{base:.4f}, fine-tunes {nll[best_ft]:.4f} to {nll[worst_ft]:.4f} nats/token.")
    stock, soup = f"stock-{n}", f"soup-{n}"
    for p in (paired(board, stock, best_ft), paired(board, stock, soup), paired(board, "stock-2", soup),
              paired(board, "soup-2", best_ft)):
        out.append(f"- {p.describe()}.")
    beats_fts = all(nll[stock] < nll[f] for f in fts)
    beats_soup = nll[stock] < nll[soup]
    out.append(f"- {stock} {'beats' if beats_fts else 'does not beat'} every fine-tune and "
               f"{'beats' if beats_soup else 'does not beat'} {soup} on NLL.")
    t = result.merge_t.get(stock)
    if t is not None:
        cos_whole = [math.cos(math.radians(a)) for a in geo.whole_angles]
        out.append(f"- t: the fine-tunes' deltas are at {geo.angle_min:.1f}°-{geo.angle_max:.1f}° to each other within "
                   f"layers (whole model: {', '.join(f'{a:.1f}°' for a in geo.whole_angles)}; cos "
                   f"{', '.join(f'{c:.3f}' for c in cos_whole)}), so mean t is {t:.3f} for {stock}"
                   + (f" and {result.merge_t['stock-2']:.3f} for stock-2" if "stock-2" in result.merge_t and n > 2
                      else "") + ".")
        out.append("- Why: " + _line_reading(stock, soup, t, base, nll[stock], nll[soup]))
    out.append(f"- Thin shell: within a layer the {n} deltas' norms differ by {100 * geo.norm_spread_median:.1f}% "
               f"(max - min over mean; median over {geo.layers} layers, at most {100 * geo.norm_spread_max:.1f}%), "
               f"and their pairwise angles by at most {geo.angle_spread_max:.1f}°: "
               + ("similar norms and one angle per layer, the paper's thin shell (thresholds used here: 10%, 5°)."
                  if geo.norm_spread_max < 0.1 and geo.angle_spread_max < 5 else
                  "norms or angles differ between the fine-tunes by more than a thin shell would (thresholds used "
                  "here: 10%, 5°)."))
    return out


def _line_reading(stock: str, soup: str, t: float, base: float, at_t: float, at_soup: float) -> str:
    """What the NLL along the line from the base to the soup says about t (the stock lies on it)."""
    line = (f"{stock} is w_0 + t (w_{soup} - w_0), a point on the line from the base to {soup}. Along it the NLL "
            f"is {base:.4f} at the base, {at_t:.4f} at t = {t:.3f} and {at_soup:.4f} at the soup")
    if at_soup < at_t < base:
        return (line + ": still falling at the soup, so t < 1 gives back part of the gain. Model Stock assumes "
                "that the fine-tunes lie on a thin shell around a center that is the better model, and t picks "
                "the point of this line nearest that center. Here moving away from the base along the "
                "fine-tunes' shared direction still helps all the way to the soup, so the pull toward the base "
                "costs more than the seed noise it removes. (The paper's fine-tunes are full ImageNet "
                "fine-tunes of CLIP ViTs, trained for epochs; these are a few steps from the base: `--steps` "
                "tests longer ones.)")
    if at_t < at_soup:
        return line + ": the best point on the line lies short of the soup, and t stops there: the anchor pays off."
    return line + "."


def write_study_readme(result: StudyResult, path: Path) -> Path:
    """Write ``study/README.md`` from ``result``."""
    s = result.settings
    geo = geometry(result.inspect_report)
    board_dir = result.leaderboard_files["md"].parent
    rel = lambda p: Path(p).relative_to(path.parent).as_posix()  # noqa: E731
    seeds = ", ".join(map(str, s.seeds()))
    seen = s.train.steps * s.train.batch_size
    task = ("- Task: GSM8K solutions. The only GSM8K installable offline is its **test** split "
            f"({result.split.source}); " if result.split.source == str(packaged_gsm8k()) else
            f"- Task: GSM8K-format solutions from {result.split.source}; ")
    lines = [
        "# Model Stock study: is the merge worth it?",
        "",
        f"Generated by `hf-model-stock demo --study` (here: `--steps {s.train.steps} --items {s.items}`, "
        f"on {result.device}).",
        "",
        "## Setup",
        "",
        f"- Base: {result.base_source}.",
        task + f"a fixed permutation holds out {len(result.split.heldout)} items that are never trained on, and leaves "
        f"{len(result.split.train)} for training ({result.n_train_usable} fit in {s.train.max_length} tokens and "
        "are used).",
        f"- {s.n_models} fine-tunes with the same hyperparameters and seeds {seeds}; the seed only sets the order "
        f"in which training items are drawn: {s.train.describe()}. Each sees {seen} training items"
        + (" (of the same pool: with this few steps, a different order means mostly different items)."
           if seen <= result.n_train_usable / 2 else "."),
        "- Merges of the fine-tunes: `soup-k` is the uniform average of ft-1..ft-k (Model Soup), `stock-k` "
        "their Model Stock merge (layer-wise, the authors' eps 1e-8, t clamped to [0, 1]), all float32.",
        f"- Evaluation through the leaderboard ({rel(result.leaderboard_files['md'])}) on the first "
        f"{result.n_heldout} held-out items of at most {s.max_item_tokens} tokens: `gsm8k_nll`, the per-token "
        "negative log-likelihood of the gold solution given the question (zero-shot, nats, lower is better)"
        + ("; `gsm8k_answer`, whether the gold final answer is the greedy continuation after the gold "
           "solution's `####` (teacher-forced exact match)" if "gsm8k_answer" in s.tasks else "")
        + ("; `gsm8k`, generative 5-shot exact match, exemplars from the training part" if "gsm8k" in s.tasks
           else "") + "."
        + ("" if "gsm8k" in s.tasks else " Exact match is not scored by default: generative GSM8K costs minutes "
           "per model on a CPU and is near 0 for a 135M model; `--exact-match` adds it and a teacher-forced "
           "variant."),
        "- Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items())
        + f"; {sum(result.seconds.values()):.0f} in all.",
        "",
        "## Results",
        "",
        *result_table(result),
        "",
        "## What the numbers show",
        "",
        *findings(result, geo),
        "",
        "## Files",
        "",
        f"- Leaderboard: {', '.join(rel(p) for p in result.leaderboard_files.values())}",
        f"- Inspect (per-layer norms, angles, t): {', '.join(rel(p) for p in result.inspect_files)}, "
        f"{rel(result.root / 'inspect' / 'inspect.txt')}",
        f"- Held-out data: {rel(result.root / 'data')}; recipes: {rel(result.root / 'recipes')}",
        "",
        f"![leaderboard]({rel(board_dir / 'leaderboard.png')})",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def print_summary(result: StudyResult) -> None:
    """The table and the findings on the console, and where the files are."""
    print()
    print("\n".join(result_table(result)))
    print()
    print("\n".join(findings(result, geometry(result.inspect_report))))
    print()
    print(f"leaderboard: {result.leaderboard_files['html']}")
    print(f"inspect: {result.root / 'inspect'}")
    if result.readme is not None:
        print(f"study: {result.readme}")
