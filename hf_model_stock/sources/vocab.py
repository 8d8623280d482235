"""Different vocabularies: which input row each row of a merged embedding comes from, by token string.

The output vocabulary is the tokenizer source's (``tokenizer_source``, default the base). Every row
of an embedding-like tensor (``embed_tokens``, an untied ``lm_head``, ...) of the output is one of:

- ``MERGE``: a token the base has. Model Stock over the fine-tunes' rows of that token (found by
  string through each model's own tokenizer, so the same token at different ids lines up); a
  fine-tune without the token contributes a zero delta to it. t (layer-wise) comes from the rows of
  tokens that every model has (``shared``) only.
- ``NEW``: a token the base lacks. There is no anchor to move towards, so the row is the mean of the
  rows of the fine-tunes that define the token.
- ``COPY``: a padded row (beyond the output tokenizer's tokens, e.g. an embedding padded to a multiple
  of 64): copied from the tokenizer source's own row when it is a model of the merge, else zeros.

Vocabularies are read from ``tokenizer.json`` (its model's vocabulary and its added tokens); a model
without one (a sentencepiece ``tokenizer.model``, as Llama-2/Mistral-era fine-tunes ship, or another
tokenizer transformers builds from its own files) is read through its own transformers tokenizer:
``get_vocab()``, the vocabulary and the added tokens (``added_tokens.json``, ``added_tokens_decoder``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_model_stock.errors import SourceError

# Tensors with one row per token (2-D, rows = vocab_size), by the end of their names.
VOCAB_TENSOR_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight",
                         "embed_in.weight", "embed_out.weight")
MERGE, NEW, COPY = 0, 1, 2
MAX_LISTED_TOKENS = 40
# Files a tokenizer without tokenizer.json is built from by transformers (sentencepiece, BPE, WordPiece).
TOKENIZER_MODEL_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


def vocab_tensor_names(headers: Mapping[str, tuple[str, tuple[int, ...]]]) -> set[str]:
    """The tensors of a checkpoint that hold one row per token."""
    return {n for n, (_, shape) in headers.items() if len(shape) == 2 and n.endswith(VOCAB_TENSOR_SUFFIXES)}


def has_vocabulary(names: Iterable[str]) -> bool:
    """Whether a model whose files are ``names`` has a vocabulary to match embedding rows by."""
    found = set(names)
    return "tokenizer.json" in found or any(n in found for n in TOKENIZER_MODEL_FILES)


def _model_files(directory: Path) -> list[Path]:
    return [directory / n for n in TOKENIZER_MODEL_FILES if (directory / n).is_file()]


def tokenizer_digest(directory: Path) -> str | None:
    """sha256 of a model's tokenizer.json (and added_tokens.json); without tokenizer.json, of the token
    -> id map its transformers tokenizer reads (``vocab:`` prefixed); None where it has neither."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        if not _model_files(Path(directory)):
            return None
        tokens = token_ids(directory) or {}
        listed = json.dumps(sorted(tokens.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False)
        return "vocab:" + hashlib.sha256(listed.encode("utf-8")).hexdigest()
    digest = hashlib.sha256(path.read_bytes())
    added = Path(directory) / "added_tokens.json"
    if added.is_file():
        digest.update(added.read_bytes())
    return digest.hexdigest()


def token_ids(directory: Path) -> dict[str, int] | None:
    """Token string -> id from ``directory/tokenizer.json``, else from the model's own transformers
    tokenizer (``tokenizer.model`` and the like); None where it has neither."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        files = _model_files(Path(directory))
        if not files:
            return None
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in Path(directory).iterdir()
                      if p.name.startswith(("tokenizer", "added_tokens", "special_tokens")) or p in files)
        return dict(_transformers_vocab(str(Path(directory).resolve()), stamp))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: unreadable tokenizer ({exc})") from None
    vocab = (data.get("model") or {}).get("vocab")
    out: dict[str, int] = {}
    if isinstance(vocab, dict):
        out.update({k: int(v) for k, v in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        out.update({p[0]: i for i, p in enumerate(vocab) if isinstance(p, list) and p})
    for tok in data.get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("content"), str):
            out[tok["content"]] = int(tok["id"])
    added = Path(directory) / "added_tokens.json"
    if added.is_file():
        extra = json.loads(added.read_text(encoding="utf-8"))
        out.update({k: int(v) for k, v in extra.items() if isinstance(v, int)})
    return out


@functools.lru_cache(maxsize=32)
def _transformers_vocab(directory: str, stamp: tuple) -> dict[str, int]:
    """``get_vocab()`` of the directory's transformers tokenizer (local files only, no remote code);
    ``stamp`` (names, times and sizes of its tokenizer files) keys the cache."""
    where = ", ".join(name for name, *_ in stamp if name in TOKENIZER_MODEL_FILES)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        vocab = tok.get_vocab()
    except ImportError as exc:
        raise SourceError(f"{directory}: reading its tokenizer ({where}) needs a package that is missing "
                          f"({str(exc).splitlines()[0] if str(exc) else exc}); pip install sentencepiece") from None
    except Exception as exc:  # transformers raises many kinds (ValueError, OSError, TypeError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{directory}: unreadable tokenizer ({where}) through transformers: {first}") from None
    return {str(k): int(v) for k, v in vocab.items()}


def added_token_entries(directory: Path) -> dict[str, dict]:
    """The ``added_tokens`` entries of ``directory/tokenizer.json`` by content; without tokenizer.json,
    those of tokenizer_config.json's ``added_tokens_decoder`` (id -> entry)."""
    path = Path(directory) / "tokenizer.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        return {t["content"]: t for t in data.get("added_tokens") or [] if isinstance(t, dict) and "content" in t}
    config = Path(directory) / "tokenizer_config.json"
    decoder = (json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}).get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        return {}
    return {e["content"]: {**e, "id": int(i)} for i, e in decoder.items()
            if isinstance(e, dict) and isinstance(e.get("content"), str) and str(i).isdigit()}


def union_tokens(base_dir: Path, model_dirs: Sequence[Path]) -> tuple[dict[str, int], list[dict]]:
    """``tokenizer_source: union``: the base's vocabulary, then every token of each fine-tune (in model
    order, then id order) that it lacks, at the next ids; and the tokenizer.json ``added_tokens``
    entries for those (the fine-tune's own entry where the token was an added token there). The base
    needs a tokenizer.json: the union is written into it as added tokens."""
    if not (Path(base_dir) / "tokenizer.json").is_file() and _model_files(Path(base_dir)):
        raise SourceError(f"tokenizer_source union: the base ({base_dir}) has no tokenizer.json to add the other "
                          "models' tokens to (only " + ", ".join(p.name for p in _model_files(Path(base_dir)))
                          + "); use tokenizer_source base or one of the models")
    tokens = dict(token_ids(base_dir) or {})
    next_id = max(tokens.values(), default=-1) + 1
    entries: list[dict] = []
    for directory in model_dirs:
        theirs = token_ids(directory) or {}
        added = added_token_entries(directory)
        for tok, _ in sorted(theirs.items(), key=lambda kv: kv[1]):
            if tok in tokens:
                continue
            entry = dict(added.get(tok) or {"content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                                           "normalized": True, "special": False})
            entry["id"] = tokens[tok] = next_id
            entries.append(entry)
            next_id += 1
    return tokens, entries


@dataclass(frozen=True)
class VocabInput:
    """One model as the row map sees it: its label, vocabulary and number of embedding rows."""

    label: str
    tokens: Mapping[str, int]
    rows: int


@dataclass
class VocabRows:
    """Where each row of the output's embedding-like tensors comes from (see the module docstring)."""

    rows: int  # rows of the output (its vocab_size)
    source: np.ndarray  # (inputs, rows) int64: each input's row for each output row, -1 where it lacks the token
    kind: np.ndarray  # (rows,) int8: MERGE, NEW or COPY
    copy_from: np.ndarray  # (rows,) int64: the input a COPY row is copied from, -1: zeros
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    added_tokens: list[dict] = field(default_factory=list)  # union: tokenizer.json entries to add to the base's

    @property
    def shared(self) -> np.ndarray:
        """Rows of tokens every model has: the rows that decide a layer-wise t."""
        return (self.kind == MERGE) & (self.source >= 0).all(0)

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.source, self.kind, self.copy_from):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def vocab_rows(inputs: Sequence[VocabInput], out_tokens: Mapping[str, int], out_rows: int,
               out_input: int | None, source_label: str) -> VocabRows:
    """The row map of a merge: ``inputs`` base first, the output vocabulary ``out_tokens`` with
    ``out_rows`` rows, ``out_input`` the index of the input it comes from (None: a directory)."""
    n_in = len(inputs)
    by_id: dict[int, str] = {}
    for tok, i in out_tokens.items():
        if 0 <= i < out_rows:
            by_id.setdefault(i, tok)
    source = np.full((n_in, out_rows), -1, dtype=np.int64)
    kind = np.full(out_rows, COPY, dtype=np.int8)
    copy_from = np.full(out_rows, -1, dtype=np.int64)
    for r in range(out_rows):
        found = by_id.get(r)
        if found is None:
            if out_input is not None and r < inputs[out_input].rows:
                copy_from[r] = out_input
                source[out_input, r] = r
            continue
        for j, inp in enumerate(inputs):
            k = inp.tokens.get(found)
            if k is not None and 0 <= k < inp.rows:
                source[j, r] = k
        kind[r] = MERGE if source[0, r] >= 0 else NEW
    result = VocabRows(rows=out_rows, source=source, kind=kind, copy_from=copy_from)
    orphans = [by_id[int(r)] for r in np.flatnonzero((kind == NEW) & (source[1:] < 0).all(0))]
    if orphans:
        shown = ", ".join(map(repr, orphans[:5])) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
        result.problems.append(f"tokenizer_source {source_label}: token(s) {shown} have no embedding row in the base "
                               "or any fine-tune")
    new = np.flatnonzero(kind == NEW)
    listed = [f"{by_id[int(r)]!r} (row {r}: mean of "
              f"{', '.join(inputs[int(j)].label for j in np.flatnonzero(source[1:, r] >= 0) + 1)})"
              for r in new[:MAX_LISTED_TOKENS]]
    pad = int((kind == COPY).sum())
    partial = int(((kind == MERGE) & ~result.shared).sum())
    result.notes.append(
        f"vocabulary of {source_label}: {out_rows} rows; {int((kind == MERGE).sum())} tokens of the base merged by "
        f"Model Stock (t from the {int(result.shared.sum())} rows every model has"
        + (f"; {partial} rows some fine-tune lacks, a zero delta for it" if partial else "") + ")"
        + (f"; {len(new)} new token(s): " + "; ".join(listed) + (" ..." if len(new) > len(listed) else "") if len(new) else "")
        + (f"; {pad} padded row(s) " + (f"copied from {inputs[out_input].label}" if out_input is not None else "zero")
           if pad else "")
    )
    return result
