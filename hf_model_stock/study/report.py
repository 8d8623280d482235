"""The study's ``README.md``: the setup, the table (from the leaderboard), paired differences (from
lm-eval's per-item records), the fine-tunes' geometry (from ``inspect``) and what the numbers show.
Every sentence that states a result is chosen by comparing the numbers, not written in advance."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hf_model_stock.study.data import ID_TASK, OOD_TASK, packaged_gsm8k

if TYPE_CHECKING:
    from hf_model_stock.analysis.inspect import InspectReport
    from hf_model_stock.leaderboard.board import Leaderboard
    from hf_model_stock.study.experiment import StudyResult

NLL = ID_TASK
EXTRA_HEADS = {"gsm8k_answer": "answer, teacher-forced", "gsm8k": "GSM8K exact match (5-shot, strict)"}
SAMPLES = "samples_hfms_{task}_*.jsonl"  # lm-eval's per-sample file (EvaluationTracker layout)
SIGNIFICANT = 2.0  # a difference is called one when it exceeds this many standard errors


@dataclass(frozen=True)
class Paired:
    """NLL/token of A minus that of B over the same items (token-weighted), with its standard error."""

    a: str
    b: str
    diff: float
    stderr: float
    n: int
    task: str = NLL

    @property
    def significant(self) -> bool:
        return abs(self.diff) > SIGNIFICANT * self.stderr

    def describe(self) -> str:
        verdict = "lower" if self.diff < 0 else "higher"
        return (f"{self.a} vs {self.b} ({self.task}): {self.diff:+.4f} ± {self.stderr:.4f} nats/token ({verdict} "
                f"for {self.a}; {'more' if self.significant else 'less'} than 2 standard errors, {self.n} items)")


def item_nll(board: Leaderboard, name: str, task: str = NLL) -> dict[int, tuple[float, int]]:
    """Per evaluated item: (summed log-likelihood of the scored text, its tokens), from the row's
    lm-eval sample file."""
    row = next(r for r in board.rows if r.name == name)
    run_dir = Path(row.results[task].run_dir)
    (path,) = list(run_dir.glob(f"*/lm_eval/**/{SAMPLES.format(task=task)}"))
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        ll, n = record["nll_per_token"]
        out[int(record["doc_id"])] = (float(ll), int(n))
    return out


def paired(board: Leaderboard, a: str, b: str, task: str = NLL) -> Paired:
    """Token-weighted difference of NLL/token (A - B) over the items both were scored on, with the
    ratio estimator's standard error (items as the sampling unit)."""
    xa, xb = item_nll(board, a, task), item_nll(board, b, task)
    ids = sorted(set(xa) & set(xb))
    d = [(-xa[i][0]) - (-xb[i][0]) for i in ids]
    n = [xa[i][1] for i in ids]
    total = sum(n)
    diff = sum(d) / total
    m = len(ids)
    var = sum((dj - diff * nj) ** 2 for dj, nj in zip(d, n)) / (m - 1) if m > 1 else float("nan")
    return Paired(a, b, diff, math.sqrt(var * m) / total if m > 1 else float("nan"), m, task)


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


def headline_value(board: Leaderboard, name: str, task: str) -> float | None:
    """The row's headline score of ``task``, or None."""
    row = next((r for r in board.rows if r.name == name), None)
    score = row.score(task) if row else None
    return None if score is None else float(score["value"])


def _values(board: Leaderboard, task: str) -> dict[str, float]:
    """Each row's headline value of ``task`` (rows without one left out)."""
    return {row.name: v for row in board.rows if (v := headline_value(board, row.name, task)) is not None}


def _with_stderr(board: Leaderboard, name: str, task: str) -> str:
    row = next((r for r in board.rows if r.name == name), None)
    score = row.score(task) if row else None
    if score is None:
        return "—"
    return f"{score['value']:.4f}" + (f" ± {score['stderr']:.4f}" if score.get("stderr") is not None else "")


def result_table(result: StudyResult) -> list[str]:
    """The Markdown table: one row per model in study order; the ID and OOD NLL (± standard error),
    any exact-match task, t, and the measured distance from the base."""
    board = result.board
    nll_tasks = [t for t in (NLL, OOD_TASK) if t in board.tasks]
    extra = [t for t in board.tasks if t not in nll_tasks]
    heads = {NLL: "ID: GSM8K NLL/token ↓", OOD_TASK: "OOD: pydoc NLL/token ↓"}
    head = ["model", "what"]
    for task in nll_tasks:
        head += [heads[task], "vs base"]
    head += [*[f"{EXTRA_HEADS.get(t, t)} ↑" for t in extra], "t", "‖w − w0‖"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in board.rows:
        cells = [row.name, describe_row(row.name, result.settings.seeds())]
        for task in nll_tasks:
            value, base = headline_value(board, row.name, task), headline_value(board, "base", task)
            cells += [_with_stderr(board, row.name, task),
                      "—" if value is None or base is None or row.name == "base" else f"{value - base:+.4f}"]
        for task in extra:
            value, score = headline_value(board, row.name, task), row.score(task)
            cells.append("—" if value is None or score is None else
                         f"{value:.3f} ({round(value * score['n'])}/{score['n']})")
        t = result.merge_t.get(row.name)
        cells.append("" if t is None else (f"mean {t:.3f}" if row.name.startswith("stock") else f"{t:.4g}"))
        distance = result.distances.get(row.name)
        cells.append("" if distance is None else f"{distance:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def describe_row(name: str, seeds: list[int]) -> str:
    if name == "base":
        return "the base, before fine-tuning"
    kind, _, k = name.partition("-")
    if kind == "ft":
        return f"fine-tune, seed {seeds[int(k) - 1]}"
    if kind == "line":
        return f"base + {float(k):g} (soup-{len(seeds)} − base)" + (", beyond the soup" if float(k) > 1 else "")
    members = ", ".join(f"ft-{i}" for i in range(1, int(k) + 1))
    return {"soup": f"uniform average of {members}", "stock": f"Model Stock of {members}",
            "interp": f"base-to-soup-{k} line, as far from the base as stock-{k}"}[kind]


def _verdict(p: Paired) -> str:
    if not p.significant:
        return "no difference beyond 2 standard errors"
    return f"{p.a if p.diff < 0 else p.b} is better"


def findings(result: StudyResult, geo: Geometry) -> list[str]:
    """What the numbers show, sentence by sentence, each chosen by a comparison."""
    board = result.board
    n = result.settings.n_models
    has_ood = OOD_TASK in board.tasks
    nll = _values(board, NLL)
    fts = [f"ft-{i}" for i in range(1, n + 1)]
    best_ft = min(fts, key=lambda x: nll[x])
    worst_ft = max(fts, key=lambda x: nll[x])
    out = []
    base = nll["base"]
    moved = all(nll[f] < base for f in fts)
    out.append(f"- Fine-tuning {'lowers' if moved else 'does not consistently lower'} the held-out (ID) NLL: base "
               f"{base:.4f}, fine-tunes {nll[best_ft]:.4f} to {nll[worst_ft]:.4f} nats/token.")
    if has_ood:
        ood = _values(board, OOD_TASK)
        forget = [paired(board, f, "base", OOD_TASK) for f in fts]
        worse = sum(p.diff > 0 and p.significant for p in forget)
        better = sum(p.diff < 0 and p.significant for p in forget)
        out.append(f"- Out of distribution (the Python reference's prose, never trained on): base {ood['base']:.4f}, "
                   f"fine-tunes {min(ood[f] for f in fts):.4f} to {max(ood[f] for f in fts):.4f} nats/token; "
                   f"{worse} of {n} fine-tunes are worse than the base by more than 2 standard errors (paired), "
                   f"{better} better" + (": fine-tuning on GSM8K costs some general prose, the forgetting a merge "
                                         "should limit." if worse else "."))
    stock, soup = f"stock-{n}", f"soup-{n}"
    tasks = [NLL, OOD_TASK] if has_ood else [NLL]
    for task in tasks:
        for p in (paired(board, stock, best_ft, task), paired(board, stock, soup, task),
                  paired(board, "soup-2", best_ft, task)):
            out.append(f"- {p.describe()}.")
    beats_fts = all(nll[stock] < nll[f] for f in fts)
    beats_soup = nll[stock] < nll[soup]
    out.append(f"- ID: {stock} {'beats' if beats_fts else 'does not beat'} every fine-tune and "
               f"{'beats' if beats_soup else 'does not beat'} {soup}.")
    out += _interp_findings(result, tasks)
    out += _line_findings(result, tasks)
    t = result.merge_t.get(stock)
    if t is not None:
        cos_whole = [math.cos(math.radians(a)) for a in geo.whole_angles]
        out.append(f"- t: the fine-tunes' deltas are at {geo.angle_min:.1f}°-{geo.angle_max:.1f}° to each other within "
                   f"layers (whole model: {', '.join(f'{a:.1f}°' for a in geo.whole_angles)}; cos "
                   f"{', '.join(f'{c:.3f}' for c in cos_whole)}), so mean t is {t:.3f} for {stock}"
                   + (f" and {result.merge_t['stock-2']:.3f} for stock-2" if "stock-2" in result.merge_t and n > 2
                      else "") + ".")
    out.append(f"- Thin shell: within a layer the {n} deltas' norms differ by {100 * geo.norm_spread_median:.1f}% "
               f"(max - min over mean; median over {geo.layers} layers, at most {100 * geo.norm_spread_max:.1f}%), "
               f"and their pairwise angles by at most {geo.angle_spread_max:.1f}°: "
               + ("similar norms and one angle per layer, the paper's thin shell (thresholds used here: 10%, 5°)."
                  if geo.norm_spread_max < 0.1 and geo.angle_spread_max < 5 else
                  "norms or angles differ between the fine-tunes by more than a thin shell would (thresholds used "
                  "here: 10%, 5°)."))
    return out


def _interp_findings(result: StudyResult, tasks: list[str]) -> list[str]:
    """Does the per-layer t carry information? stock-k against interp-k, equally far from the base."""
    board = result.board
    out = []
    for k in range(2, result.settings.n_models + 1):
        stock, interp = f"stock-{k}", f"interp-{k}"
        if stock not in result.distances or interp not in result.distances:
            continue
        ds, di = result.distances[stock], result.distances[interp]
        verdicts = [(task, paired(board, stock, interp, task)) for task in tasks]
        out.append(f"- Per-layer t against one t: {stock} and {interp} are equally far from the base (measured "
                   f"‖w − w0‖ {ds:.4f} and {di:.4f}; {interp} at t = {result.merge_t[interp]:.4f}). "
                   + "; ".join(f"{task}: {p.diff:+.4f} ± {p.stderr:.4f} ({_verdict(p)})" for task, p in verdicts)
                   + ".")
    pairs = [paired(board, f"stock-{k}", f"interp-{k}", task) for k in range(2, result.settings.n_models + 1)
             for task in tasks if f"interp-{k}" in result.distances]
    if pairs:
        wins = [p for p in pairs if p.significant and p.diff < 0]
        losses = [p for p in pairs if p.significant and p.diff > 0]
        out.append("- So the layer-wise t " + (
            "carries information here: Model Stock's split of the same distance between layers beats one t "
            f"in {len(wins)} of {len(pairs)} comparisons and loses none." if wins and not losses else
            "is worse than one t here: spreading the same distance evenly does better "
            f"in {len(losses)} of {len(pairs)} comparisons." if losses and not wins else
            f"gives mixed results here ({len(wins)} wins, {len(losses)} losses of {len(pairs)})." if wins else
            f"shows no effect here: at equal distance from the base, none of {len(pairs)} comparisons differs by "
            "more than 2 standard errors; what Model Stock changes is mainly how far it goes from the base."))
    return out


def line_points(result: StudyResult) -> list[tuple[float, str]]:
    """(t, row) of the models on the base-to-soup-N line, by t: the base, the line's points, interp-N, the soup."""
    n = result.settings.n_models
    points = [(0.0, "base"), (1.0, f"soup-{n}")]
    points += [(t, name) for name, t in result.merge_t.items() if name.startswith("line-") or name == f"interp-{n}"]
    return sorted(points)


def _line_findings(result: StudyResult, tasks: list[str]) -> list[str]:
    """The NLL along the base-to-soup-N line (interp-N and the line's points are on it; stock-N is not)."""
    board = result.board
    n = result.settings.n_models
    points = line_points(result)
    if len(points) <= 2:
        return []
    out = []
    for task in tasks:
        scores = _values(board, task)
        values = [(t, name, scores[name]) for t, name in points if name in scores]
        ranked = sorted(values, key=lambda v: v[2])
        best_t, best_name, _ = ranked[0]
        where = ("beyond the soup: the line is still falling at t = 1" if best_t > 1 else
                 "at the soup" if best_t == 1 else "at the base" if best_t == 0 else
                 "between the base and the soup")
        runner_up = ranked[1][1]
        p = paired(board, best_name, runner_up, task)
        out.append(f"- Along the base-to-soup-{n} line ({task}): "
                   + ", ".join(f"t {t:.4g} {v:.4f}" for t, _, v in values)
                   + f"; lowest at t = {best_t:.4g} ({best_name}), {where}; against the next lowest, {runner_up}: "
                   f"{p.diff:+.4f} ± {p.stderr:.4f} ({'more' if p.significant else 'less'} than 2 standard errors).")
    if f"stock-{n}" in result.merge_t:
        out.append(f"- stock-{n} is not on this line: its t differs by layer (mean {result.merge_t[f'stock-{n}']:.3f}); "
                   f"interp-{n} is the point of the line at its distance from the base.")
    return out


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
        "their Model Stock merge (layer-wise, the authors' eps 1e-8, t clamped to [0, 1]), `interp-k` the line "
        "from the base to soup-k at the one t where it is as far from the base as stock-k (whole model: "
        "t = sqrt(Σ_l t_l² ‖m_l‖² / Σ_l ‖m_l‖²), m_l the layer's mean delta; same distance, only its split "
        f"between layers differs), `line-t` the line from the base to soup-{s.n_models} at fixed t (t 1.25 "
        "extrapolates past the soup); all float32, all built by the leaderboard from recipes.",
        f"- Evaluation through the leaderboard ({rel(result.leaderboard_files['md'])}) on the first "
        f"{result.n_heldout} held-out items of at most {s.max_item_tokens} tokens: `gsm8k_nll`, the per-token "
        "negative log-likelihood of the gold solution given the question (zero-shot, nats, lower is better)"
        + ("; `gsm8k_answer`, whether the gold final answer is the greedy continuation after the gold "
           "solution's `####` (teacher-forced exact match)" if "gsm8k_answer" in s.tasks else "")
        + ("; `gsm8k`, generative 5-shot exact match, exemplars from the training part" if "gsm8k" in s.tasks
           else "") + "."
        + ("" if "gsm8k" in s.tasks else " Exact match is not scored by default: generative GSM8K costs minutes "
           "per model on a CPU and is near 0 for a 135M model; `--exact-match` adds it and a teacher-forced "
           "variant.")
        + (f" Out of distribution: `{OOD_TASK}`, the same per-token NLL on {result.n_ood} prose paragraphs of the "
           "Python language reference (the standard library's `pydoc_data.topics`, what `help()` shows) given "
           "each section's title: English expository text with no arithmetic word problems, installed with "
           "Python, never trained on, so a rise measures what fine-tuning on GSM8K forgot." if OOD_TASK in s.tasks
           else "")
        + " Each score's ± is its standard error over items (a ratio estimator, items as the unit); the "
        "comparisons below are paired, over the same items, called a difference only beyond 2 standard errors.",
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
        *([f"![in vs out of distribution]({rel(result.id_ood)})", ""] if result.id_ood else []),
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
