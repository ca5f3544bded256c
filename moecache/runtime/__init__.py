"""The offloading runtime: expert weights in host memory, a GPU slot pool driven by policies and predictors.

``moecache.offload(model, gpu_memory=...)`` patches a loaded transformers MoE model in place and
returns an ``OffloadHandle`` (``stats()``, ``remove()``). One concept per module:

* ``layout``: where each weight of one expert sits inside a slot;
* ``hoststore``: every expert in host memory, and the one allocator that decides pinning;
* ``pool``: the device slot pool shared by all MoE layers;
* ``engine``: copy engines (Python ``sync``/``stream``, C++ ``worker``) that execute copies;
* ``experts``: the module that replaces ``experts`` and the shells that run transformers' kernels;
* ``core``: the per-layer path (routing sync, residency via the policy, kernel, prefetch);
* ``stats``: counters and the derived figures;
* ``offload``: building all of it onto a model, and taking it off again.
"""

from .engine import COPY_ENGINES, CopyError
from .offload import OffloadHandle, offload, parse_bytes

__all__ = ["offload", "OffloadHandle", "parse_bytes", "COPY_ENGINES", "CopyError"]
