"""Access to the compiled extension ``moecache._C``, with one switch to force the Python paths.

Set ``MOECACHE_DISABLE_EXT=1`` to run without the extension even where it is built: the tests use
it to compare the C++ paths against the Python reference. Callers do::

    C = extension()
    if C is not None: ... fast path ... else: ... reference ...
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

ENV_DISABLE = "MOECACHE_DISABLE_EXT"


def disabled_by_env() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    try:
        import torch  # noqa: F401  (the extension links against libtorch; load it first)
        from . import _C  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"not built ({e}); run `pip install --no-build-isolation -e .` to build it"
    return _C, "built"


def extension() -> ModuleType | None:
    """The extension module, or None when it is missing or disabled by ``MOECACHE_DISABLE_EXT``."""
    if disabled_by_env():
        return None
    return _load()[0]


def extension_status() -> dict[str, object]:
    mod, why = _load()
    status: dict[str, object] = {"available": mod is not None, "status": why, "disabled_by_env": disabled_by_env()}
    if mod is not None:
        status["build_flags"] = mod.build_flags()
        status["with_cuda"] = bool(mod.with_cuda())
        status["file"] = getattr(mod, "__file__", None)
    return status
