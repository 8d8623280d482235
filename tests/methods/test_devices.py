"""The device choice: ``mps`` on Apple silicon goes to the torch kernels (tested with torch's MPS
availability mocked: this machine has no Metal GPU); ``auto`` never picks it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_model_stock.errors import ModelStockError
from hf_model_stock.merge.compute import UnitCompute
from hf_model_stock.methods import devices
from hf_model_stock.methods.torch_kernels import BlockKernel


@pytest.fixture()
def mac(monkeypatch) -> None:
    """Apple silicon as torch sees it: MPS built and available, no CUDA, no GPU driver files."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "GPU_DRIVER_FILES", ())


def test_mps_is_chosen_only_when_asked(mac):
    assert devices.resolve_device("mps") == "mps"
    assert devices.resolve_device("auto") == "cpu"
    assert devices.resolve_device("cpu") == "cpu"
    with pytest.raises(ModelStockError, match=r"^device 'cuda' requested but no CUDA GPU is available"):
        devices.resolve_device("cuda")


@pytest.mark.parametrize("built, why", [(True, "this Mac has no Metal GPU or macOS is too old"),
                                        (False, "this torch was built without MPS")])
def test_mps_where_it_is_missing_is_one_line(monkeypatch, built, why):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: built)
    with pytest.raises(ModelStockError) as exc:
        devices.resolve_device("mps")
    assert str(exc.value) == f"device 'mps' requested but it is not available ({why}; use --device cpu)"
    with pytest.raises(ModelStockError, match=r"^unknown device 'tpu' \(use auto, cpu, cuda, mps\)$"):
        devices.resolve_device("tpu")


def test_the_cli_passes_mps_through(mac, monkeypatch, tmp_path, capsys):
    from hf_model_stock.cli import main
    from tests.modelgen import finetunes, write_checkpoint

    base = {"w": torch.randn(8, 8)}
    write_checkpoint(tmp_path / "b", base)
    for name, ft in zip("xy", finetunes(base, 2)):
        write_checkpoint(tmp_path / name, ft)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code = main(["merge", "--base", str(tmp_path / "b"), "--model", str(tmp_path / "x"),
                 "--model", str(tmp_path / "y"), "--out", str(tmp_path / "out"), "--device", "mps", "-q"])
    assert code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err == ("error: device 'mps' requested but it is not available (this Mac has no "
                                       "Metal GPU or macOS is too old; use --device cpu)\n")


def test_mps_units_take_the_torch_kernels():
    compute = UnitCompute(3, workers=0, device="mps", scratch_elems=64)
    try:
        assert compute._fused is None and compute._scratch is None and compute._workers == 1
    finally:
        compute.close()


def test_mps_gram_is_formed_in_float32_and_summed_in_float64_on_the_host():
    """The MPS branch of the block Gram, run on CPU tensors (MPS itself has no float64: nothing in it
    may ask the device for one): every block's float32 Gram summed in float64, as the reference."""
    gen = torch.Generator().manual_seed(1)
    sources = [torch.randn(5000, generator=gen) for _ in range(4)]
    kernel = BlockKernel(3, block=1024)
    kernel.device = torch.device("mps")  # the buffers stay on the CPU; only the branch changes
    kernel._gpu64 = False
    gram = kernel.gram(sources, 0, 5000)
    assert gram.dtype == torch.float64 and gram.device.type == "cpu"
    d = torch.stack([s - sources[0] for s in sources[1:]])
    expected = sum(((d[:, s : s + 1024] @ d[:, s : s + 1024].T).double() for s in range(0, 5000, 1024)),
                   torch.zeros(3, 3, dtype=torch.float64))
    np.testing.assert_array_equal(gram.numpy(), expected.numpy())
