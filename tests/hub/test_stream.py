"""--stream: Hub sources' weights read with HTTP range requests during the merge, over real HTTP
against the Hub stand-in (tests/fake_hub.py): bitwise the merge of downloaded copies, each byte
fetched once, nothing stored, faults (dropped connection, ignored Range, wrong bytes, 401) and
Ctrl-C then --resume."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hf_model_stock.cli import main
from hf_model_stock.hub import retry as retry_module
from hf_model_stock.hub import stream as stream_module
from hf_model_stock.hub.ranges import RemoteFile
from hf_model_stock.hub.stream import RemoteShard
from hf_model_stock.hub.stream_state import STREAM_STATE_NAME
from hf_model_stock.merge.journal import JOURNAL_NAME, read_journal
from tests.merge.test_resume import interrupt_after

REPOS = ["org/base", "org/ft0", "org/ft1", "org/ft2"]
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    """1000-byte range requests, 3 in flight: tensors and units cross piece boundaries everywhere."""
    monkeypatch.setattr(stream_module, "PIECE_BYTES", 1000)
    monkeypatch.setattr(stream_module, "WINDOW", 3)
    monkeypatch.setattr(retry_module, "_backoff", lambda s: None)  # no backoff waits in tests


@pytest.fixture
def published(hub, models) -> dict[str, Path]:
    for repo, key in zip(REPOS, ["base", "ft0", "ft1", "ft2"]):
        hub.add_commit(repo, models[key])
    return models


def data_bytes(hub) -> int:
    """Bytes of tensor data (after the header) in every published shard."""
    total = 0
    for repo in REPOS:
        for name, data in hub.files(repo).items():
            if name.endswith(".safetensors"):
                total += len(data) - 8 - struct.unpack("<Q", data[:8])[0]
    return total


def args(out: Path, *sources: str, extra: tuple[str, ...] = ()) -> list[str]:
    models = sum([["--model", s] for s in sources[1:]], [])
    # 2 KiB units: the embedding and the MLP matrices are merged in two passes
    return ["merge", "--base", sources[0], *models, "--out", str(out), "--chunk-size", "2KiB", "-q", *extra]


def shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix == ".safetensors"}


@pytest.fixture
def reference(published, tmp_path) -> dict[str, bytes]:
    out = tmp_path / "ref"
    assert main(args(out, *(str(published[k]) for k in ["base", "ft0", "ft1", "ft2"]))) == 0
    return shards(out)


def cached_blobs(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "hf-cache").rglob("*") if p.is_file() and p.stat().st_size > 4096]


def test_stream_is_bitwise_the_local_merge_fetches_each_byte_once_and_stores_nothing(hub, reference, tmp_path):
    hub.reset_stats()
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream",))) == 0
    assert shards(tmp_path / "out") == reference
    assert hub.weight_bytes_served == data_bytes(hub)  # two-pass tensors included: fetched once
    assert not [p for p in (tmp_path / "hf-cache").rglob("*.safetensors")]
    assert not cached_blobs(tmp_path)
    assert not (tmp_path / "out" / STREAM_STATE_NAME).exists()
    ranges = [r.range for r in hub.requests("GET", "/resolve/") if r.path.endswith(SHARD1)]
    assert len(ranges) > 10 and all(r and r.startswith("bytes=") for r in ranges)


def test_local_and_streamed_sources_in_one_merge(hub, published, reference, tmp_path):
    hub.reset_stats()
    assert main(args(tmp_path / "out", str(published["base"]), "org/ft0", str(published["ft1"]), "org/ft2",
                     extra=("--stream",))) == 0
    assert shards(tmp_path / "out") == reference
    assert not [r for r in hub.requests("GET", "/resolve/") if "/org/base/" in r.path and r.path.endswith("tensors")]


@pytest.fixture
def storage_hub(tmp_path, monkeypatch):
    """A Hub that sends LFS files from another origin by signed URLs, keeps connections alive, and
    holds private repos (the token must reach the Hub, never the storage origin)."""
    from tests.fake_hub import FakeHub
    from tests.hub_fixtures import set_hub_env

    with FakeHub(token="hf_secret_token", cdn=True, keep_alive=True, max_threads=32) as fake:
        set_hub_env(monkeypatch, fake.url, tmp_path, token="hf_secret_token")
        yield fake


def local_reference(models: dict[str, Path], out: Path) -> dict[str, bytes]:
    assert main(args(out, *(str(models[k]) for k in ["base", "ft0", "ft1", "ft2"]))) == 0
    return shards(out)


def test_stream_from_storage_redirects_asks_once_per_shard_and_sends_no_token_off_the_hub(storage_hub, models,
                                                                                          tmp_path):
    for repo, key in zip(REPOS, ["base", "ft0", "ft1", "ft2"]):
        storage_hub.add_commit(repo, models[key], private=True)
    reference = local_reference(models, tmp_path / "ref")
    storage_hub.reset_stats()
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream",))) == 0
    assert shards(tmp_path / "out") == reference
    assert storage_hub.cdn_auth_seen == 0  # the Hub token never went to storage
    assert storage_hub.weight_bytes_served == data_bytes(storage_hub)  # each byte once, from storage
    heads = sorted(r.path for r in storage_hub.requests("HEAD", "/resolve/") if r.path.endswith(".safetensors"))
    assert heads == sorted(f"/{repo}/resolve/{storage_hub.repos[repo].branches['main']}/{shard}"
                           for repo in REPOS for shard in (SHARD1, SHARD2))  # where each shard lives: asked once
    gets = storage_hub.requests("GET", "/cdn/")
    assert len(gets) > 40 and all(r.status == 206 for r in gets)
    assert storage_hub.connections < len(gets) / 2  # connections were reused for the next ranges


def test_an_expired_storage_url_is_asked_for_again(storage_hub, models, tmp_path):
    for repo, key in zip(REPOS, ["base", "ft0", "ft1", "ft2"]):
        storage_hub.add_commit(repo, models[key], private=True)
    reference = local_reference(models, tmp_path / "ref")
    storage_hub.cdn_ttl = 1.0  # signed URLs last about a second ...
    storage_hub.bandwidth = data_bytes(storage_hub) / 4  # ... and the merge takes about four
    storage_hub.reset_stats()
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream",))) == 0
    assert shards(tmp_path / "out") == reference
    assert [r for r in storage_hub.requests("GET", "/cdn/") if r.status == 403]  # storage refused expired URLs
    heads = [r.path for r in storage_hub.requests("HEAD", "/resolve/") if r.path.endswith(".safetensors")]
    assert len(heads) > len(set(heads))  # and the client asked the Hub for new ones
    assert storage_hub.weight_bytes_served == data_bytes(storage_hub)


def test_a_connection_dropped_mid_tensor_is_resumed(hub, reference, tmp_path):
    hub.fail("GET", f"/org/ft1/resolve/*/{SHARD2}", mode="drop", after_bytes=300, times=3, range_from=9)
    hub.reset_stats()
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream",))) == 0
    assert shards(tmp_path / "out") == reference
    assert all(f.times == 0 for f in hub.faults)
    assert hub.weight_bytes_served == data_bytes(hub)  # the retries asked only for the bytes not received


def test_a_straggling_connection_is_overtaken_by_a_second_one(hub, reference, tmp_path, monkeypatch):
    """One range answered at 50 bytes/s (20 s for a piece): once later pieces have arrived and it has
    taken 4x the usual piece, it is asked for again on another connection, and the merge goes on."""
    monkeypatch.setattr(stream_module, "HEDGE_AFTER_S", 0.3)
    hub.fail("GET", f"/org/ft1/resolve/*/{SHARD2}", mode="slow", rate=50.0, range_from=3000)
    hub.reset_stats()
    started = time.monotonic()
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream",))) == 0
    assert time.monotonic() - started < 9.0
    assert shards(tmp_path / "out") == reference
    assert all(f.times == 0 for f in hub.faults)  # the slow answer was given ...
    slow = [r for r in hub.requests("GET", "/org/ft1/resolve/") if r.path.endswith(SHARD2) and r.range
            and int(r.range[6:].split("-")[0]) >= 3000]
    assert len({r.range for r in slow}) < len(slow)  # ... and its range asked for twice


def test_a_network_that_keeps_failing_stops_in_one_line_keeping_what_was_merged_for_resume(hub, reference, tmp_path,
                                                                                           capsys):
    out, partial = tmp_path / "out", tmp_path / ".hfms-partial-out"
    fault = hub.fail("GET", f"/org/ft1/resolve/*/{SHARD2}", mode="drop", after_bytes=10, times=100, range_from=9)
    assert main(args(out, *REPOS, extra=("--stream",))) == 2
    err = error_line(capsys)
    assert err.startswith("error: org/ft1@") and f"/{SHARD2}: download failed 6 times" in err
    assert f"kept in {partial}: run the same command with --resume to continue" in err
    assert not out.exists() and (partial / JOURNAL_NAME).is_file()
    done = {e["tensor"] for e in read_journal(partial / JOURNAL_NAME)[1]}
    assert done  # the tensors of the first shards were merged before the failure
    fault.times = 0  # the network is back
    hub.reset_stats()
    assert main(args(out, *REPOS, extra=("--stream", "--resume"))) == 0
    assert shards(out) == reference
    assert hub.weight_bytes_served < data_bytes(hub)  # finished tensors were not fetched again


def test_a_server_that_ignores_range_is_refused_not_downloaded(hub, published, tmp_path, capsys):
    hub.ignore_range = True
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream",))) == 2
    err = error_line(capsys)
    assert "the server ignored the Range header (HTTP 200" in err and "run without --stream" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".hfms-partial-out").exists()


def test_a_shard_whose_bytes_do_not_match_its_sha256_fails_and_leaves_nothing(hub, published, tmp_path, capsys):
    hub.corrupt.add(f"org/ft2/{SHARD2}")
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream",))) == 2
    err = error_line(capsys)
    assert err.startswith(f"error: org/ft2: shard {SHARD2} does not match the Hub's LFS sha256")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".hfms-partial-out").exists()


def test_a_401_names_the_repo_and_hf_token(hub, published, tmp_path, capsys):
    hub.fail("GET", f"/org/ft0/resolve/*/{SHARD1}", mode="status", status=401, times=100, range_from=9)
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream",))) == 2
    err = error_line(capsys)
    assert err.startswith(f"error: org/ft0: the Hub refused access (HTTP 401, {SHARD1}) and no token was sent")
    assert "HF_TOKEN" in err
    assert not (tmp_path / "out").exists()


def error_line(capsys) -> str:
    """The one error line (stderr also carries the small files' download bars)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_ctrl_c_then_resume_does_not_fetch_finished_tensors_again(hub, reference, tmp_path, monkeypatch, caplog):
    out, partial = tmp_path / "out", tmp_path / ".hfms-partial-out"
    with monkeypatch.context() as m:
        interrupt_after(m, 8)
        assert main(args(out, *REPOS, extra=("--stream",))) == 130
    assert (partial / JOURNAL_NAME).is_file() and (partial / STREAM_STATE_NAME).is_file()
    done = {e["tensor"] for e in read_journal(partial / JOURNAL_NAME)[1]}
    assert len(done) >= 4
    hub.reset_stats()
    assert main(args(out, *REPOS, extra=("--stream", "--resume"))) == 0
    assert shards(out) == reference
    assert not (out / STREAM_STATE_NAME).exists() and not cached_blobs(tmp_path)
    # Bytes of the finished tensors were not fetched again, but for at most one piece per shard
    done_bytes = 0
    for repo in REPOS:
        for name, data in hub.files(repo).items():
            if name.endswith(".safetensors"):
                header_len = struct.unpack("<Q", data[:8])[0]
                header = json.loads(data[8:8 + header_len])
                done_bytes += sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k in done)
    assert done_bytes > 0
    assert hub.weight_bytes_served <= data_bytes(hub) - done_bytes + 8 * stream_module.PIECE_BYTES


def test_remote_shard_reads_out_of_order_and_twice_then_checks_the_hash(hub, tmp_path):
    data = bytes(range(256)) * 40  # 10240 bytes
    hub.add_commit("org/blob", {"w.safetensors": data})
    from huggingface_hub import hf_hub_url

    f = RemoteFile(url=hf_hub_url("org/blob", "w.safetensors", revision="main"), size=len(data), repo_id="org/blob",
                   filename="w.safetensors", revision="main", sha256=hashlib.sha256(data).hexdigest())
    # regions: [100, 2100) read twice, [5000, 9000) once, [9500, 9600) once (read before [5000, 9000))
    regions = [(100, 2000, 2), (5000, 4000, 1), (9500, 100, 1)]
    with ThreadPoolExecutor(4) as pool:
        shard = RemoteShard(f, pool, regions, piece=999, window=2, spill_dir=tmp_path)
        out = bytearray(2000)
        shard.read(100, memoryview(out)[:700])
        shard.read(800, memoryview(out)[700:])
        assert out == data[100:2100]
        tail = bytearray(100)
        shard.read(9500, memoryview(tail))  # skips [5000, 9000) ahead: kept for later
        assert tail == data[9500:9600]
        again = bytearray(2000)
        shard.read(100, memoryview(again))  # the second pass: from the spill file
        assert again == data[100:2100]
        mid = bytearray(4000)
        shard.read(5000, memoryview(mid))
        assert mid == data[5000:9000] and shard.finished
    assert sum(r.body_bytes for r in hub.requests("GET", "/resolve/")) == len(data)  # each byte fetched once


def test_remote_shard_with_wrong_bytes_raises_at_its_last_read(hub, tmp_path):
    data = bytes(range(256)) * 8
    hub.add_commit("org/blob", {"w.safetensors": data})
    hub.corrupt.add("org/blob/w.safetensors")
    from huggingface_hub import hf_hub_url

    from hf_model_stock.errors import CheckpointError

    f = RemoteFile(url=hf_hub_url("org/blob", "w.safetensors", revision="main"), size=len(data), repo_id="org/blob",
                   filename="w.safetensors", revision="main", sha256=hashlib.sha256(data).hexdigest())
    with ThreadPoolExecutor(2) as pool:
        shard = RemoteShard(f, pool, [(0, 100, 1)], piece=300, window=2)
        with pytest.raises(CheckpointError, match="org/blob: shard w.safetensors does not match the Hub's LFS sha256"):
            shard.read(0, memoryview(bytearray(100)))


def test_every_unreachable_source_is_named_in_one_line(hub, published, tmp_path, capsys):
    assert main(args(tmp_path / "out", "org/base", "org/ft0", "org/nope1", "org/nope2", extra=("--stream",))) == 2
    err = error_line(capsys)
    assert "org/nope1: repository not found" in err and "org/nope2: repository not found" in err


def test_incompatible_streamed_models_fail_from_headers_before_any_weight(hub, published, tmp_path, capsys):
    from tests.hub_fixtures import CONFIG, tiny_llama
    from tests.modelgen import write_checkpoint

    hub.add_commit("org/wide", write_checkpoint(tmp_path / "wide", tiny_llama(5, inter=40), shards=2, config=CONFIG))
    hub.reset_stats()
    assert main(args(tmp_path / "out", "org/base", "org/ft0", "org/wide", extra=("--stream",))) == 2
    assert "incompatibilities with base org/base" in error_line(capsys)
    assert hub.weight_bytes_served == 0


def _blob_shard(hub, data: bytes):
    from huggingface_hub import hf_hub_url

    hub.add_commit("org/blob", {"w.safetensors": data})
    return RemoteFile(url=hf_hub_url("org/blob", "w.safetensors", revision="main"), size=len(data), repo_id="org/blob",
                      filename="w.safetensors", revision="main", sha256=hashlib.sha256(data).hexdigest())


def _drain_for(shard, seconds: float, until: int) -> int:
    drained, end = 0, time.monotonic() + seconds
    while time.monotonic() < end and shard._cursor < until:
        drained += shard.drain()
        time.sleep(0.001)
    return drained


def test_pieces_drained_to_the_spill_during_a_second_pass_are_read_back_exactly(hub, tmp_path):
    data = bytes((i * 7) % 251 for i in range(20000))
    f = _blob_shard(hub, data)
    regions = [(0, 3000, 2), (3000, 9000, 1), (15000, 5000, 1)]
    with ThreadPoolExecutor(4) as pool:
        shard = RemoteShard(f, pool, regions, piece=700, window=3, spill_dir=tmp_path)
        got = bytearray(len(data))
        shard.read(0, memoryview(got)[:3000])  # the first pass over a two-pass region
        shard.read(0, memoryview(got)[:1000])  # the second: read from the spill, the stream is not consumed
        # meanwhile the pieces that arrive go to the spill file, so that the connections keep going
        drained = _drain_for(shard, 10.0, len(data) - 700)
        assert drained > 10, (drained, shard._cursor, [(p.offset, p.future.done()) for p in shard._pieces._pieces])
        for pos, n in [(1000, 2000), (3000, 4500), (7500, 4500), (15000, 5000)]:
            view = memoryview(got)[pos:pos + n]
            shard.read(pos, view)
            assert view == data[pos:pos + n]
        assert shard.finished
    assert sum(r.body_bytes for r in hub.requests("GET", "/resolve/")) == len(data)


def test_a_merge_that_merely_lags_behind_the_network_spills_nothing(hub, tmp_path):
    """Reads that are slower than the network (the CPU sets the pace) leave the pieces in memory: the
    spill would only add work; pieces are moved aside only while a second pass reads the spill."""
    data = bytes((i * 5) % 253 for i in range(20000))
    f = _blob_shard(hub, data)
    with ThreadPoolExecutor(4) as pool:
        shard = RemoteShard(f, pool, [(0, 20000, 1)], piece=700, window=3, spill_dir=tmp_path)
        got = bytearray(len(data))
        shard.read(0, memoryview(got)[:1000])
        assert _drain_for(shard, 0.6, len(data)) == 0  # every piece in the window arrives, the reads take none
        shard.read(1000, memoryview(got)[1000:])
        assert got == data and shard.finished and not shard._spill.written


def test_reads_of_drained_bytes_do_not_keep_the_drain_going(hub, tmp_path):
    """After a second pass, the reads go on with bytes drained meanwhile (from the spill); that is not a
    second pass: once the drained bytes are used up the reads take from the stream again."""
    data = bytes((i * 3) % 241 for i in range(30000))
    f = _blob_shard(hub, data)
    with ThreadPoolExecutor(4) as pool:
        shard = RemoteShard(f, pool, [(0, 2000, 2), (2000, 28000, 1)], piece=700, window=3, spill_dir=tmp_path)
        got = bytearray(len(data))
        shard.read(0, memoryview(got)[:2000])
        shard.read(0, memoryview(got)[:2000])  # second pass
        assert _drain_for(shard, 10.0, 6000) > 0
        drained_to = shard._cursor
        shard.read(2000, memoryview(got)[2000:drained_to - 100])  # from the spill: drained bytes
        assert _drain_for(shard, 0.6, len(data)) == 0 and shard._cursor == drained_to
        shard.read(drained_to - 100, memoryview(got)[drained_to - 100:])
        assert got == data and shard.finished


def test_dry_run_with_stream_prints_the_plan_without_fetching_weights(hub, published, tmp_path, capsys):
    hub.reset_stats()
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream", "--dry-run"))) == 0
    out = capsys.readouterr().out
    assert "pre-flight: OK" in out and "bytes in:" in out and "shard:  model" in out
    assert hub.weight_bytes_served == 0 and not (tmp_path / "out").exists() and not cached_blobs(tmp_path)


def test_a_read_waiting_on_a_slow_network_gives_up_when_the_merge_is_interrupted(hub, tmp_path):
    import threading

    from hf_model_stock.errors import SourceError

    data = bytes(200_000)
    hub.add_commit("org/blob", {"w.safetensors": data})
    hub.bandwidth = 20_000  # bytes/s: a piece takes seconds
    from huggingface_hub import hf_hub_url

    f = RemoteFile(url=hf_hub_url("org/blob", "w.safetensors", revision="main"), size=len(data), repo_id="org/blob",
                   filename="w.safetensors", revision="main", sha256=hashlib.sha256(data).hexdigest())
    errors: list[BaseException] = []
    with ThreadPoolExecutor(2) as pool:
        shard = RemoteShard(f, pool, [(0, len(data), 1)], piece=100_000, window=2)

        def read() -> None:
            try:
                shard.read(0, memoryview(bytearray(len(data))))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)
        started = time.monotonic()
        shard.cancel()
        reader.join(timeout=5)
        assert not reader.is_alive() and time.monotonic() - started < 1.0
        shard.close()
    assert len(errors) == 1 and isinstance(errors[0], SourceError) and "interrupted" in str(errors[0])


def test_a_filter_wise_stream_keeps_nothing_for_a_second_pass(hub, published, tmp_path, monkeypatch):
    spilled: list[int] = []
    write_spill = RemoteShard._write_spill
    monkeypatch.setattr(RemoteShard, "_write_spill", lambda self, pos, data: (spilled.append(len(data)),
                                                                               write_spill(self, pos, data)))
    assert main(args(tmp_path / "layer", *REPOS, extra=("--stream",))) == 0
    assert spilled  # layer-wise, the tensors larger than a unit keep their first pass for the second
    spilled.clear()
    local = tmp_path / "local"
    assert main(args(local, *(str(published[k]) for k in ["base", "ft0", "ft1", "ft2"]),
                     extra=("--granularity", "filter"))) == 0
    assert main(args(tmp_path / "out", *REPOS, extra=("--stream", "--granularity", "filter"))) == 0
    assert shards(tmp_path / "out") == shards(local)
    assert not spilled
