"""Offline routing-trace analysis: the metrics behind ``moecache analyze`` and its report.

One module per metric family, all reading the access stream of ``access.py``:
``popularity`` (skew), ``stackdist`` (LRU / OPT stack distances), ``curves`` (hit rate against
capacity), ``locality`` (temporal reuse), ``consistency`` (local routing consistency),
``affinity`` (cross-layer), ``variation`` (phases, sequences), ``shift`` (two traces);
``run`` ties them together, ``plots`` draws, ``report`` writes the report folder.
"""

from .access import Accesses, accesses
from .run import Options, analyze_trace

__all__ = ["Accesses", "accesses", "Options", "analyze_trace"]
