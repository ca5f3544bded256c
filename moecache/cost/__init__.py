"""The cost model shared by the runtime and the simulator.

``hardware``: the hardware profile (one expert's copy, GPU and CPU cost by tokens, the non-expert
time of a layer), its defaults and loading measured profiles. ``timing``: the three-resource
timeline (copy engine, GPU, CPU), the miss rules, the hybrid copy-or-CPU decision (``choose_copy``)
and the reuse credit. The runtime's hybrid executor and the simulator's replay both decide with these
very functions, so estimates and measurements follow the same rules.
"""

from .hardware import HardwareProfile, default_profile, load_profile
from .timing import MISS_RULES, MissRule, Timeline, choose_copy, reuse_credit, reuse_rate

__all__ = ["HardwareProfile", "default_profile", "load_profile", "MISS_RULES", "MissRule", "Timeline", "choose_copy",
           "reuse_credit", "reuse_rate"]
