"""``eval/e2e_compare.py`` with ``torch.profiler`` around each candidate's timed replay: where the host
time of a configuration goes (kernel launches, host-device copies, blocking calls), candidate against
candidate. The timed replay is cut to one sequence of at most ``MOECACHE_PROFILE_TOKENS`` (40) rows; the
profiler's own overhead inflates every op, so compare counts and shares, not the ms/step it prints.
Each profile table goes to ``$OUT/profN.txt`` (N in candidate order) and to stdout.

    OUT=/tmp/p python3 eval/e2e_profile.py --model deepseek --batch 1 --configs e \\
        --candidates lru,lru+hybrid:rule=auto --time-budget 200 --trace build/ds_trace --out /tmp/p/x.json
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e_compare as ec  # noqa: E402
import e2e_harness as eh  # noqa: E402

ROWS = int(os.environ.get("MOECACHE_PROFILE_TOKENS", "40"))
_run_forced = eh.run_forced
_count = [0]


def profiled_run(*args: Any, **kwargs: Any) -> Any:
    if kwargs.get("time_limit_s") is None:  # the warm-up: as it is
        return _run_forced(*args, **kwargs)
    from torch.profiler import ProfilerActivity, profile

    kwargs["max_tokens"] = min(kwargs.get("max_tokens") or ROWS, ROWS)
    seqs = kwargs.get("sequences")
    if isinstance(seqs, list):
        kwargs["sequences"] = seqs[:1]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        res = _run_forced(*args, **kwargs)
    _count[0] += 1
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"prof{_count[0]}.txt"), "w") as f:
        f.write(table)
    print(table, flush=True)
    return res


if __name__ == "__main__":
    eh.run_forced = profiled_run  # the harness runs every timed replay
    raise SystemExit(ec.main(sys.argv[1:]))
