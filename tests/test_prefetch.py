"""The read-ahead hint finds local shards, ignores Hub ids, and never fails a merge."""

from hf_model_stock.io import prefetch


def test_shard_files_local_only(tmp_path):
    (tmp_path / "m").mkdir()
    for name in ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "config.json"]:
        (tmp_path / "m" / name).write_bytes(b"x" * 10)
    single = tmp_path / "single.safetensors"
    single.write_bytes(b"y")
    found = prefetch.shard_files([tmp_path / "m", single, "org/not-a-local-dir"])
    assert [p.name for p in found] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                       "single.safetensors"]


def test_advise_tolerates_missing_files(tmp_path):
    real = tmp_path / "a.safetensors"
    real.write_bytes(b"z" * 100)
    prefetch._advise([real, tmp_path / "gone.safetensors"], budget=1 << 30)  # no exception
    prefetch.start([tmp_path, "org/name"])
