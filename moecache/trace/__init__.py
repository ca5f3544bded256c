"""Routing traces: the data model, the on-disk store, importers and the recorder."""

from .schema import (FORMAT_VERSION, ID_DROPPED, ID_MISSING, ID_ORDERS, PHASE_DECODE, PHASE_NAMES,
                     PHASE_PREFILL, PHASE_UNKNOWN, UNKNOWN, WEIGHT_KINDS, RoutingBlock, TraceMeta)
from .store import Trace, TraceWriter, count_ids, finalise_partial, open_trace, write_trace

__all__ = [
    "FORMAT_VERSION", "ID_DROPPED", "ID_MISSING", "ID_ORDERS", "PHASE_DECODE", "PHASE_NAMES",
    "PHASE_PREFILL", "PHASE_UNKNOWN", "UNKNOWN", "WEIGHT_KINDS", "RoutingBlock", "TraceMeta",
    "Trace", "TraceWriter", "count_ids", "finalise_partial", "open_trace", "write_trace",
]
