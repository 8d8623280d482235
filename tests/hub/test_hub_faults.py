"""Faults on every kind of Hub request are handled the same way, wherever the request is made (pre-flight,
resolution, --stream): header reads are retried like data reads, a refused token names HF_TOKEN, and no
signed storage URL reaches a message."""

from __future__ import annotations

import hashlib

import pytest

from hf_model_stock.cli import main
from hf_model_stock.hub import retry as retry_module
from tests.hub.test_stream import REPOS, args, local_reference, shards

KEYS = ["base", "ft0", "ft1", "ft2"]


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(retry_module, "_backoff", lambda s: None)


@pytest.fixture
def storage_hub(tmp_path, monkeypatch):
    """A Hub that sends LFS files from another origin by signed URLs, with private repos."""
    from tests.fake_hub import FakeHub
    from tests.hub_fixtures import set_hub_env

    with FakeHub(token="hf_secret_token", cdn=True, keep_alive=True, max_threads=32) as fake:
        set_hub_env(monkeypatch, fake.url, tmp_path, token="hf_secret_token")
        yield fake


@pytest.fixture
def private(storage_hub, models, tmp_path) -> dict[str, bytes]:
    for repo, key in zip(REPOS, KEYS):
        storage_hub.add_commit(repo, models[key], private=True)
    return local_reference(models, tmp_path / "ref")


def shard_shas(hub) -> list[str]:
    return [hashlib.sha256(data).hexdigest() for repo in REPOS for name, data in hub.files(repo).items()
            if name.endswith(".safetensors")]


@pytest.mark.parametrize("stream", [False, True], ids=["preflight", "stream"])
@pytest.mark.parametrize("fault", [{"mode": "status", "status": 503}, {"mode": "drop", "after_bytes": 500}],
                         ids=["503", "cut-at-500"])
def test_a_fault_on_each_shards_header_read_is_retried(storage_hub, private, tmp_path, stream, fault):
    """Every shard's first range request (the 8-byte length) answers 503, or its header read is cut
    after 500 bytes: retried, and the merge is bitwise the local one."""
    for sha in shard_shas(storage_hub):  # one fault per shard, on its first range request (or the header's)
        storage_hub.fail("GET", f"/cdn/{sha}*", **fault, **({} if fault["mode"] == "status" else {"range_from": 8}))
    storage_hub.reset_stats()
    extra = ("--stream",) if stream else ()
    assert main(args(tmp_path / "out", *REPOS, extra=extra)) == 0
    assert shards(tmp_path / "out") == private
    assert all(f.times == 0 for f in storage_hub.faults)  # every fault was met
    assert all(f.times == 0 for f in storage_hub.faults)  # every fault was met, and got over


def test_a_wrong_token_is_named_once_per_source_without_resume_advice(storage_hub, private, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    for extra in ((), ("--stream",)):
        assert main(args(tmp_path / "out", *REPOS, extra=extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.count("HF_TOKEN") == len(REPOS), err
        assert ("org/base: the Hub refused the token in HF_TOKEN (HTTP 401): set it to a token that can read this "
                "repository") in err
        assert "resume" not in err and "hf_wrong" not in err
        assert not (tmp_path / "out").exists()


def test_storage_that_keeps_failing_never_prints_its_signed_url(storage_hub, private, tmp_path, capsys):
    storage_hub.fail("GET", "/cdn/*", mode="status", status=503, times=10_000)
    for extra in ((), ("--stream",)):
        assert main(args(tmp_path / "out", *REPOS, extra=extra)) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")][-1]
        assert "503" in err, err
        assert "sig=" not in err and "expires=" not in err, err
        assert not (tmp_path / "out").exists()


def test_the_url_scrubber_drops_queries_only():
    from hf_model_stock.hub.errors import scrub_urls

    assert scrub_urls("for url 'http://127.0.0.1:9/cdn/ab?expires=1&sig=zz' now") == "for url 'http://127.0.0.1:9/cdn/ab' now"
    assert scrub_urls("see https://hf.co/org/m") == "see https://hf.co/org/m"


def test_a_header_read_from_a_server_that_ignores_range_reads_only_the_header(hub, models, tmp_path):
    """Pre-flight against a server that answers ranges with the whole file (HTTP 200) reads as far as the
    header, and the merge downloads as usual."""
    for repo, key in zip(REPOS, KEYS):
        hub.add_commit(repo, models[key])
    hub.ignore_range = True
    reference = local_reference(models, tmp_path / "ref")
    assert main(args(tmp_path / "out", *REPOS)) == 0
    assert shards(tmp_path / "out") == reference


REQUEST_KINDS = {  # {repo}: each repo gets its own faults
    "repo info": ("GET", "/api/models/{repo}/revision/*"),
    "tree listing": ("GET", "/api/models/{repo}/tree/*"),
    "file metadata (HEAD)": ("HEAD", "/{repo}/resolve/*"),
    "small files (GET)": ("GET", "/{repo}/resolve/*/config.json"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["preflight", "stream"])
@pytest.mark.parametrize("kind, mode", [(k, m) for k in REQUEST_KINDS for m in ("503", "drop")
                                        if not (m == "drop" and REQUEST_KINDS[k][0] == "HEAD")])  # a HEAD has no body
def test_faults_on_every_kind_of_hub_request_are_retried(storage_hub, private, tmp_path, stream, kind, mode):
    """A failure (a 503, or a connection dropped before the body) on each repo's requests of one kind:
    retried, wherever the request is made, and the merge is bitwise the local one."""
    method, pattern = REQUEST_KINDS[kind]
    fault = {"mode": "status", "status": 503} if mode == "503" else {"mode": "drop", "after_bytes": 0}
    for repo in REPOS:
        storage_hub.fail(method, pattern.format(repo=repo), times=1, **fault)
    extra = ("--stream",) if stream else ()
    assert main(args(tmp_path / "out", *REPOS, extra=extra)) == 0
    assert shards(tmp_path / "out") == private
    assert all(f.times == 0 for f in storage_hub.faults)  # every fault was met


def test_a_hub_that_keeps_failing_metadata_is_tried_by_huggingface_hub_alone(storage_hub, private, tmp_path,
                                                                             monkeypatch):
    """huggingface_hub retries a download's HEAD itself (5 more tries): our retries do not multiply
    them (six times six HEADs, minutes against an unreachable Hub), and the error is one line."""
    import time

    from hf_model_stock.errors import SourceError
    from hf_model_stock.hub import listing

    monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub's own backoff
    storage_hub.fail("HEAD", f"/{REPOS[0]}/resolve/*", mode="status", status=503, times=10_000)
    storage_hub.reset_stats()
    with pytest.raises(SourceError) as info:
        listing.download(REPOS[0], "config.json", "main")
    heads = storage_hub.requests("HEAD", "config.json")
    assert len(heads) == 7, len(heads)  # huggingface_hub's own tries, once (not times our 6)
    assert str(info.value) == "org/base: the Hub kept answering HTTP 503 after retries; try again later"
    assert listing.download(REPOS[1], "config.json", "main").is_file()  # other repos are unaffected


def test_a_head_that_failed_after_huggingface_hubs_tries_is_final():
    """Unit: with ``head_retried`` a failed HEAD (found through the exception chain) is not tried again;
    a failed GET is, and without ``head_retried`` so is the HEAD."""
    import httpx2

    calls = []

    def failing(method):
        def call():
            calls.append(method)
            try:
                raise httpx2.ConnectError("refused", request=httpx2.Request(method, "http://127.0.0.1:9/x"))
            except httpx2.ConnectError as exc:  # wrapped, as huggingface_hub's errors wrap the request's
                raise httpx2.ConnectError("cannot reach the Hub") from exc
        return call

    for method, head_retried, tries in (("HEAD", True, 1), ("GET", True, retry_module.RETRIES + 1),
                                        ("HEAD", False, retry_module.RETRIES + 1)):
        calls.clear()
        with pytest.raises(httpx2.ConnectError):
            retry_module.retrying(failing(method), head_retried=head_retried)
        assert len(calls) == tries, (method, head_retried)
