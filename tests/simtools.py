"""Small helpers shared by the simulator tests: hand-made traces and per-need outcome strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from moecache.cost import HardwareProfile
from moecache.sim import Schedule, simulate
from moecache.trace import PHASE_DECODE, RoutingBlock, Trace, TraceMeta


def make_trace(tokens: Sequence, *, num_experts: int, top_k: int = 1, seq: Sequence[int] | int = 0,
               step: Sequence[int] | None = None, bytes_per_expert: int = 1_000_000) -> Trace:
    """``tokens[t][l]`` = the ids of token ``t`` at MoE layer ``l`` (an int when top_k is 1)."""
    ids = np.array([[([x] if np.isscalar(x) else list(x)) for x in tok] for tok in tokens], np.int64)
    n, L, _k = ids.shape
    meta = TraceMeta(num_experts=num_experts, top_k=top_k, moe_layers=list(range(L)), model="toy",
                     bytes_per_expert=bytes_per_expert)
    block = RoutingBlock.build(ids, seq=seq, pos=np.arange(n), step=np.arange(n) if step is None else step,
                               phase=PHASE_DECODE)
    return Trace(meta, block)


def single_layer(seq: str, num_experts: int = 4) -> Trace:
    """``"ABAC"`` -> a one-layer, top-1 trace with experts A=0, B=1, ..."""
    return make_trace([[ord(c) - ord("A")] for c in seq], num_experts=num_experts)


def outcomes(trace: Trace, policy, predictor=None, **kw) -> str:
    """One letter per need in replay order: H hit, M miss (copied), C miss run on the CPU."""
    log: list = []
    simulate(Schedule(trace), policy, predictor, record=log, bound=False, **kw)
    letter = {"hit": "H", "copy": "M", "cpu": "C"}
    return "".join(letter[o] for _g, _k, _c, o in sorted(log, key=lambda r: (r[0], r[1])))


def unit_profile(copy_ms: float = 1.0, gpu: float = 0.5, cpu: float = 2.0, non_expert: float = 1.0) -> HardwareProfile:
    """A profile with round numbers for hand-computed timelines (1 MB experts at 1 GB/s = 1 ms)."""
    return HardwareProfile(bytes_per_expert=1_000_000, copy_bandwidth_gbps=1.0 / copy_ms, copy_latency_ms=0.0,
                           gpu_ms={1: gpu}, cpu_ms={1: cpu}, non_expert_ms={1: non_expert}, source="test")


def mixtral_prefix(routing_dir: Path, tokens: int = 40) -> Trace:
    """GSM8K problem 0, its first ``tokens`` decode tokens at all 32 layers, read straight from the
    published JSONL (a tiny local reader, independent of moecache.trace.importers)."""
    path = routing_dir / "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe" / "gsm8k_2_routing.jsonl"
    ids = np.full((tokens, 32, 2), -1, np.int64)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["problem_id"] == 0 and r["token_idx"] < tokens:
                ids[r["token_idx"], r["layer"]] = r["experts"]
    assert (ids >= 0).all(), "the first tokens of problem 0 have every layer"
    meta = TraceMeta(num_experts=8, top_k=2, moe_layers=list(range(32)), model="mixtral-8x7b",
                     bytes_per_expert=3 * 4096 * 14336 * 2)
    block = RoutingBlock.build(ids, seq=0, pos=np.arange(tokens), step=np.arange(tokens), phase=PHASE_DECODE)
    return Trace(meta, block)
