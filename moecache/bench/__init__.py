"""The benchmark harness: a suite is a grid of simulator runs (traces x scopes x capacities x policies x
predictors x prefetch depths) with a resumable journal, tables and plots (``moecache bench --suite``).

``config`` reads and checks a suite config, ``plan`` lays out the grid (run or skipped, with reasons),
``journal`` keeps finished rows across kills, ``suite`` runs the grid in worker processes, ``report``
and ``plots`` write the outputs. The replay it drives is ``moecache.sim``.
"""

from .config import load_config, parse_config
from .plan import Plan, plan_suite
from .suite import SuiteResult, run_suite

__all__ = ["load_config", "parse_config", "Plan", "plan_suite", "SuiteResult", "run_suite"]
