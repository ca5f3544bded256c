"""moecache.tensorfile reads what safetensors wrote, tensor by tensor and row by row, without a map."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from moecache.errors import ConfigError
from moecache.tensorfile import TensorFile


@pytest.fixture()
def saved(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(5, 3, 7, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(4, 9, generator=g),
        "c.i64": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "d.f16": torch.randn(2, generator=g).to(torch.float16),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
    }
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_reads_every_tensor_bit_for_bit(saved):
    path, tensors = saved
    with TensorFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        for key, want in tensors.items():
            got = f.get_tensor(key)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.view(torch.uint8) if got.dtype == torch.bool else got,
                               want.view(torch.uint8) if want.dtype == torch.bool else want), key


def test_rows_equal_slices(saved):
    path, tensors = saved
    with TensorFile(path) as f:
        for key in ("a.bf16", "b.f32", "c.i64"):
            for i in range(tensors[key].shape[0]):
                assert torch.equal(f.get_row(key, i), tensors[key][i])
        with pytest.raises(IndexError):
            f.get_row("a.bf16", 5)


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    path, _ = saved
    cut = str(tmp_path / "cut.safetensors")
    with open(path, "rb") as src, open(cut, "wb") as dst:
        data = src.read()
        dst.write(data[:-40])
    with TensorFile(cut) as f:
        with pytest.raises(ConfigError, match="ends early"):
            for key in f.keys():
                f.get_tensor(key)


@pytest.mark.parametrize("content", [b"", b"\x05\x00", b"\xff" * 8 + b"{}", b"\x04\x00\x00\x00\x00\x00\x00\x00{no"])
def test_not_safetensors(tmp_path, content):
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(ConfigError, match="safetensors"):
        TensorFile(path)


def test_close_releases_the_descriptor(saved):
    path, _ = saved
    f = TensorFile(path)
    fd = f._fd
    f.close()
    with pytest.raises(OSError):
        os.fstat(fd)
