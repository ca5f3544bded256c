"""moecache: run Mixture-of-Experts models whose experts do not fit in GPU memory.

Routing traces (record, import, inspect) live in ``moecache.trace``; cache policies in
``moecache.policies``; expert predictors in ``moecache.predictors``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ConfigError, MoecacheError, TraceFormatError, UnsupportedModelError  # noqa: E402
from .trace import Trace, TraceMeta, open_trace  # noqa: E402


def record(model, path, **kwargs):
    """Record the routing of every forward pass of ``model`` into a trace at ``path``.

    A context manager; see ``moecache.trace.recorder.RoutingRecorder`` for the options.
    """
    from .trace.recorder import RoutingRecorder

    return RoutingRecorder(model, path, **kwargs)


def offload(model, gpu_memory=None, **kwargs):
    """Patch a loaded transformers MoE model in place to run with its experts offloaded; returns a handle
    with ``stats()`` and ``remove()``. See ``moecache.runtime.offload.offload`` for the options."""
    from .runtime import offload as _offload

    return _offload(model, gpu_memory, **kwargs)


def from_pretrained(path, gpu_memory=None, **kwargs):
    """Load a local checkpoint straight into the offloaded layout; see ``moecache.loading.from_pretrained``."""
    from .loading import from_pretrained as _from_pretrained

    return _from_pretrained(path, gpu_memory, **kwargs)


def run_forced(model, trace, **kwargs):
    """Run ``model`` with its routing forced to ``trace`` (teacher forcing); see
    ``moecache.forced_routing.run_forced``."""
    from .forced_routing import run_forced as _run_forced

    return _run_forced(model, trace, **kwargs)


def replay(model, trace, **kwargs):
    """Deprecated name of ``run_forced`` (kept for one release)."""
    import warnings

    warnings.warn("moecache.replay is deprecated; use moecache.run_forced (same arguments)", DeprecationWarning,
                  stacklevel=2)
    return run_forced(model, trace, **kwargs)


__all__ = ["__version__", "record", "offload", "from_pretrained", "run_forced", "replay", "open_trace", "Trace", "TraceMeta", "MoecacheError", "TraceFormatError",
           "UnsupportedModelError", "ConfigError"]
