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


__all__ = ["__version__", "record", "open_trace", "Trace", "TraceMeta", "MoecacheError", "TraceFormatError",
           "UnsupportedModelError", "ConfigError"]
