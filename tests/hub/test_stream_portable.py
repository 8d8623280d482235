"""Hub sources without the Linux-only calls (as on macOS and Windows): downloaded and streamed merges
write the same bytes as the local merge, through the portable fallbacks (io/platform.py)."""

from __future__ import annotations

import pytest

from hf_model_stock.cli import main
from tests.hub.test_stream import REPOS, args, published, shards, small_pieces  # noqa: F401 (fixtures)
from tests.io.test_platform import strip_linux


@pytest.mark.usefixtures("published")
@pytest.mark.parametrize("extra", [(), ("--stream",), ("--stream", "--granularity", "filter")],
                         ids=["download", "stream", "stream-filter-wise"])
def test_hub_merges_without_linux_calls_write_the_same_bytes(tmp_path, monkeypatch, extra):
    assert main(args(tmp_path / "ref", *REPOS, extra=extra)) == 0
    expected = shards(tmp_path / "ref")
    seeks = strip_linux(monkeypatch)
    assert main(args(tmp_path / "out", *REPOS, extra=extra)) == 0
    assert shards(tmp_path / "out") == expected
    assert seeks  # the portable fallbacks were used
