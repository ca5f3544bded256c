"""The compiled extension against its Python reference, and the switch that disables it."""

import numpy as np
import pytest

from moecache._ext import extension, extension_status


def _reference(ids: np.ndarray, num_experts: int) -> np.ndarray:
    out = np.zeros((ids.shape[1], num_experts), np.int64)
    for l in range(ids.shape[1]):
        x = ids[:, l].ravel()
        out[l] = np.bincount(x[x >= 0], minlength=num_experts)
    return out


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("MOECACHE_DISABLE_EXT", "1")
    assert extension() is None
    assert extension_status()["disabled_by_env"] is True


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64])
def test_count_experts_matches_reference(dtype):
    C = extension()
    if C is None:
        pytest.skip(f"extension not available: {extension_status()['status']}")
    import torch

    rng = np.random.default_rng(0)
    ids = rng.integers(-2, 16, size=(257, 5, 3)).astype(dtype)
    got = C.count_experts(torch.from_numpy(ids), 16).numpy()
    np.testing.assert_array_equal(got, _reference(ids, 16))
    with pytest.raises(RuntimeError, match="out of range"):
        C.count_experts(torch.from_numpy(ids), 4)
    with pytest.raises(RuntimeError, match="shape"):
        C.count_experts(torch.zeros(3, dtype=torch.int32), 4)


@pytest.mark.gpu
def test_count_experts_cuda_matches_reference():
    C = extension()
    assert C is not None, extension_status()["status"]
    assert C.with_cuda(), "extension built without its CUDA sources on a CUDA machine"
    import torch

    rng = np.random.default_rng(1)
    for dtype in (np.int16, np.int32, np.int64):
        ids = rng.integers(-2, 64, size=(1000, 26, 6)).astype(dtype)
        got = C.count_experts(torch.from_numpy(ids).cuda(), 64)
        assert got.is_cuda
        np.testing.assert_array_equal(got.cpu().numpy(), _reference(ids, 64))
