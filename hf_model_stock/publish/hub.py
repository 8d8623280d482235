"""Push a merged model directory to the Hub: create the repo, write the card, upload the folder.

``HfApi.upload_folder`` already avoids re-sending content the Hub has (LFS batch: objects it holds get
no upload action; preupload returns each remote file's oid and unchanged files leave the commit;
with hf_xet, the pipelined upload resumes by content). Before that we compare the shards' sha256 in
merge_report.json with the remote files' LFS sha256 and leave matching shards out of the upload
entirely, so a re-run after an interruption neither re-hashes nor re-sends them.

    hf-model-stock push merged/math --repo my-org/math-stock [--private] [--revision BRANCH] [--message ...]

>>> push_model(Path("merged/math"), "my-org/math-stock")  # doctest: +SKIP
'https://huggingface.co/my-org/math-stock/commit/4f1c...'
"""

from __future__ import annotations

import argparse
import glob
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_model_stock.errors import ModelStockError
from hf_model_stock.hub.errors import first_line, refused_message, status_of, transport_errors
from hf_model_stock.hub.retry import retrying

if TYPE_CHECKING:
    from hf_model_stock.publish.report import MergeReport
    from hf_model_stock.recipe import Recipe

logger = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CARD_NAME = "README.md"


class PushError(ModelStockError):
    """The Hub refused or failed a push (names the repo and what to do next)."""


def _report(directory: Path) -> MergeReport | None:
    from hf_model_stock.publish.report import REPORT_NAME, load_report

    if not (directory / REPORT_NAME).is_file():
        return None
    try:
        return load_report(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PushError(f"{directory / REPORT_NAME}: unreadable ({exc})") from None


def prepare_card(directory: Path, repo_id: str, report: MergeReport | None) -> None:
    """Make sure ``directory/README.md`` is our model card, titled with ``repo_id``.

    A card already there is kept (it may carry evaluation results) and only retitled; without one,
    it is built from merge_report.json.
    """
    from huggingface_hub import ModelCard

    from hf_model_stock.publish.card import card_text, retitle_card

    path = directory / CARD_NAME
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        card = retitle_card(ModelCard(old), repo_id)
        if str(card) != old:
            card.save(path)
    elif report is not None:
        path.write_text(card_text(report, repo_id=repo_id), encoding="utf-8")


def unchanged_shards(api: Any, repo_id: str, revision: str | None, directory: Path,
                     report: MergeReport | None) -> list[str]:
    """Shards whose sha256 in merge_report.json equals the LFS sha256 (and size) of the remote file."""
    from huggingface_hub.hf_api import RepoFile

    shards = report.shards if report is not None else {}
    if not shards:
        return []
    remote = retrying(lambda: {
        f.path: f
        for f in api.list_repo_tree(repo_id, revision=revision, recursive=True)
        if isinstance(f, RepoFile) and f.lfs is not None
    })
    same = []
    for name, digest in sorted(shards.items()):
        local, there = directory / name, remote.get(name)
        lfs = there.lfs if there is not None else None
        if lfs is not None and local.is_file() and lfs.sha256 == digest and lfs.size == local.stat().st_size:
            same.append(name)
    return same


def _default_message(report: MergeReport | None) -> str:
    if report is None:
        return "Upload model with hf-model-stock"
    n = len(report.sources.models)
    return f"Model Stock merge of {n} fine-tunes (hf-model-stock)"


def _push_error(repo_id: str, exc: BaseException) -> PushError:
    from huggingface_hub.errors import HfHubHTTPError

    status = status_of(exc)
    first = first_line(exc)
    cause = exc.__cause__
    if cause is not None:  # upload errors wrap the HTTP error: name it too
        first += f": {first_line(cause)}"
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return PushError(refused_message(repo_id, status, "the push", write=True))
    return PushError(f"{repo_id}: push failed ({type(exc).__name__}: {first}); run the same push again to resume, "
                     "files already on the Hub are not sent again")


def push_model(
    directory: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
) -> str:
    """Upload a merged model directory to ``repo_id`` and return the commit URL (it ends with the sha).

    Creates the repo if needed (``private`` applies only then) and the branch ``revision`` if it does
    not exist, writes the model card, and uploads the folder; shards already on the Hub with the
    same sha256 are not sent again.

    >>> push_model(Path("merged/math"), "my-org/math-stock", private=True)  # doctest: +SKIP
    """
    from huggingface_hub import HfApi, constants


    directory = Path(directory).expanduser()
    if not REPO_ID.match(repo_id):
        raise PushError(f"{repo_id}: not a Hub repo id (write org/name)")
    if not directory.is_dir():
        raise PushError(f"{directory}: no such directory")
    if constants.is_offline_mode():
        raise PushError(f"{repo_id}: cannot push while HF_HUB_OFFLINE is set")
    report = _report(directory)
    prepare_card(directory, repo_id, report)
    api = HfApi()
    try:
        retrying(lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        if revision and revision != constants.DEFAULT_REVISION:
            retrying(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
        skip = unchanged_shards(api, repo_id, revision, directory, report)
        if skip:
            logger.info("%d shard(s) already on the Hub with the same sha256: not uploaded again", len(skip))
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            revision=revision,
            commit_message=message or _default_message(report),
            ignore_patterns=[glob.escape(name) for name in skip],
        )
    except (*transport_errors(), RuntimeError, ValueError) as exc:  # type: ignore[misc]  # uploads raise RuntimeError, bad metadata ValueError
        raise _push_error(repo_id, exc) from None
    return str(info.commit_url)


def push_recipe_output(recipe: Recipe, directory: Path) -> str | None:
    """Push ``directory`` as the recipe's ``output.push_to_hub`` says; None when it says nothing."""
    target = recipe.output.push_to_hub
    if target is None:
        return None
    return push_model(directory, target.repo_id, private=target.private, revision=target.revision,
                      message=target.commit_message)


def add_push_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``push`` command to the CLI's subparsers."""
    p = subparsers.add_parser("push", help="upload a merged model directory to the Hub (repo, card, files)")
    p.add_argument("directory", type=Path, help="a merged model directory (with merge_report.json)")
    p.add_argument("--repo", required=True, help="Hub repo id org/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", help="branch to push to (created if missing; default main)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_cmd_push)
    return p


def _cmd_push(args: argparse.Namespace) -> int:
    url = push_model(args.directory, args.repo, private=args.private, revision=args.revision, message=args.message)
    print(f"pushed {args.directory} -> {url}")
    return 0
