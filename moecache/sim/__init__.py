"""The trace-replay simulator: cache policies and predictors over a routing trace, with timing.

``Schedule`` lays a trace out for replay, ``simulate`` (``simulator``) runs one policy (+ predictor,
prefetch) over it on the Python or the C++ engine (``engine_python``, ``engine_cpp``, picked by
``engines``) and returns a ``SimResult`` row. The cost model it times with (hardware profile,
timeline, miss rules) is ``moecache.cost``, shared with the runtime; prefetch rules (``prefetch``),
the lower bound (``bound``) and capacity parsing (``capacity``) each live in their own module. The
benchmark suite that drives it is ``moecache.bench``.
"""

from .bound import Bound, lower_bound, split_time
from .capacity import parse_capacities, resolve_capacity
from .prefetch import PREFETCH_RULES
from .results import SimResult, format_table
from .schedule import Future, Schedule
from .simulator import simulate

__all__ = ["Bound", "lower_bound", "split_time", "parse_capacities", "resolve_capacity", "PREFETCH_RULES",
           "simulate", "SimResult", "format_table", "Future", "Schedule"]
