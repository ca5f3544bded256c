"""Shared fixtures: the read-only ../shared data (skipped cleanly where absent) and GPU marks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Under CI, property tests run a fixed set of examples (derandomised): a red CI run reproduces, and
# new random finds come from local runs, which keep exploring.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOECACHE_SHARED", ROOT.parent / "shared"))
ROUTING = SHARED / "data" / "routing"
TINY_MODEL = SHARED / "data" / "models" / "qwen3moe-tiny-code"


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU-only test; run on the GPU machine with `pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def routing_dir() -> Path:
    if not ROUTING.is_dir():
        pytest.skip(f"real routing traces not found at {ROUTING} (../shared is absent)")
    return ROUTING


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    if not (TINY_MODEL / "config.json").is_file():
        pytest.skip(f"trained model not found at {TINY_MODEL} (../shared is absent)")
    return TINY_MODEL


@pytest.fixture
def no_ext(monkeypatch):
    """Force the pure-Python paths (the extension's reference implementations)."""
    monkeypatch.setenv("MOECACHE_DISABLE_EXT", "1")


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (two shared cores: avoids oversubscription stalls; results do not
    depend on it). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored after): loading and streaming tests time nothing, but
    torch's thread pool on a busy 2-core machine makes them crawl."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
