"""The CPU side of hybrid execution: the kernels that run a missed expert on the host. ``CppKernel``
drives the C++ pool ``moecache._C.CpuExpertPool`` (csrc/cpu_expert.cpp) for the concatenated SwiGLU
layout; ``CppQuantKernel`` drives the same pool on compressed host rows (int8, int4, MXFP4;
csrc/cpu_expert_quant.cpp dequantizes in registers) for that layout and for GPT-OSS's (biases, the
clamped SwiGLU); ``TorchKernel`` runs the model's own experts class on host views of the store (on
experts expanded from their compressed rows where the store is compressed) for anything else, or where
the extension is missing or disabled. ``make_kernel`` picks one and says why.

Compressed experts on the C++ kernel run in one of two modes (``QUANT_MODES``; ``HybridConfig.quant_mode``):

* ``exact``: every weight is dequantized as ``moecache.quant`` states it (fp32, rounded once to the compute
  dtype), the sums run in fp32 and the biases and the activation are applied in fp32; the output is
  rounded to the model dtype once, by the caller. Against the torch reference (``reference_ffn``: the same
  dequantized weights, float64 sums) the output is within ``QUANT_RTOL`` of its largest magnitude.
* ``fast`` (the default): each token row (and the down projection's input) is quantized once to int16
  per group of the weights' group size, and the kernel multiplies the weights' integer codes by it in
  int32 (AVX512-VNNI where present), applying each group's scales once (csrc/cpu_expert_quant.h). The
  weights are used as dequantized in fp32, not rounded to bf16. Against the same reference the output is
  within ``quant_fast_rtol(format, compute dtype)`` of its largest magnitude (MXFP4 too: its codes are
  small integers, 2 * e2m1, times the block's power of two).

Both tolerances are asserted by tests/test_cpu_quant_kernels.py."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch
from torch import nn

from .._ext import extension
from ..errors import ConfigError
from ..quant import ExpertCodec
from .experts import make_shell

ENV_KERNEL = "MOECACHE_CPU_KERNEL"
CPU_KERNELS = ("auto", "portable", "avx2", "avx512", "torch")


#: Environment variable that sets the CPU kernel's thread count (default: ``default_threads()``).
ENV_THREADS = "MOECACHE_CPU_THREADS"


def default_threads() -> int:
    """Usable cores minus two, or ``$MOECACHE_CPU_THREADS``. One core runs the thread that launches GPU
    work, one the copy worker: both spin while they wait on CUDA (the driver's default for a single
    context), and a pool thread descheduled for a time slice holds up the whole expert it is part of."""
    env = os.environ.get(ENV_THREADS)
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ConfigError(f"{ENV_THREADS}={env!r} is not a thread count; set a positive integer or unset it")
        if n < 1:
            raise ConfigError(f"{ENV_THREADS}={env!r}: the CPU kernel needs at least one thread")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 2)


# -- CPU kernels ------------------------------------------------------------------------------------

#: The C++ pool's code for each compressed format.
QUANT_FORMAT_CODES = {"int8": 0, "int4": 1, "mxfp4": 2}
#: The C++ kernel's activations: 0 = silu(gate) * up (concatenated rows), 1 = GPT-OSS's clamped SwiGLU.
ACT_SILU, ACT_GPT_OSS = 0, 1
#: Tolerance of the compressed C++ kernel against ``reference_ffn``: max |kernel - reference| over the
#: output's max |reference| (fp32 sums in another order than float64 ones, over up to ~15k inputs).
QUANT_RTOL = 1e-5
#: The compressed kernel's modes (see the module docstring); the first is the default.
QUANT_MODES = ("fast", "exact")
#: Environment variable that sets the mode where ``HybridConfig.quant_mode`` is not given (CLI runs).
ENV_QUANT_MODE = "MOECACHE_CPU_QUANT_MODE"
#: Tolerances of the fast mode against ``reference_ffn`` (same measure as ``QUANT_RTOL``). Where the
#: reference's weights are the fp32 dequantized ones (fp32 compute dtype, or MXFP4, exact in bf16), only
#: the int16 activations differ (a relative 2^-16 of each group's largest, twice): ``QUANT_FAST_RTOL``.
#: For int8/int4 with a bf16 compute dtype the reference rounds every weight to bf16 (up to 2^-9
#: relative) and the fast mode does not: ``QUANT_FAST_BF16_RTOL``.
QUANT_FAST_RTOL = 2e-4
QUANT_FAST_BF16_RTOL = 1e-2


def quant_fast_rtol(fmt: str, compute_dtype: torch.dtype) -> float:
    """The fast mode's tolerance for ``fmt`` experts computed in ``compute_dtype`` (see above)."""
    return QUANT_FAST_BF16_RTOL if compute_dtype == torch.bfloat16 and fmt != "mxfp4" else QUANT_FAST_RTOL


def _matrix_shape(ki: Any) -> tuple[int, int]:
    """(out, in) of a codec kind (``moecache.quant.KindInfo``)."""
    return (ki.shape[1], ki.shape[0]) if ki.transposed else tuple(ki.shape)


def quant_mismatch(original: nn.Module, codec: ExpertCodec) -> tuple[str | None, int, float, float]:
    """(None, act, alpha, limit) when the C++ kernel computes ``original``'s experts from ``codec``'s rows
    (concatenated SwiGLU with SiLU, or GPT-OSS's interleaved, biased, clamped SwiGLU), else (why not, ...)."""
    dtype = codec.dense.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return f"its compute dtype is {dtype}; the compressed C++ kernel computes in bf16 or fp32", 0, 0.0, 0.0
    kinds = {k.name: k for k in codec.kinds}
    if set(kinds) == {"gate_up_proj", "down_proj"}:
        shapes = {n: _matrix_shape(k) for n, k in kinds.items()}
        if any(k.transposed for k in kinds.values()):
            return "its expert matrices are transposed", 0, 0.0, 0.0
        return swiglu_mismatch(original, shapes, dtype), ACT_SILU, 0.0, 0.0
    if set(kinds) != {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}:
        return f"its expert weights are {sorted(kinds)}, not gate_up_proj and down_proj (with or without biases)", \
            0, 0.0, 0.0
    (two_i, h), (h2, i) = _matrix_shape(kinds["gate_up_proj"]), _matrix_shape(kinds["down_proj"])
    if two_i != 2 * i or h2 != h:
        return "gate_up_proj and down_proj are not (2I, H) and (H, I) matrices", 0, 0.0, 0.0
    gate = getattr(type(original), "_apply_gate", None)
    if getattr(gate, "__qualname__", "") != "GptOssExperts._apply_gate":
        return "its experts with biases are not GPT-OSS's (clamped SwiGLU, interleaved gate/up)", 0, 0.0, 0.0
    alpha, limit = getattr(original, "alpha", None), getattr(original, "limit", None)
    if alpha is None or limit is None:
        return "its GPT-OSS experts lack alpha or limit", 0, 0.0, 0.0
    return None, ACT_GPT_OSS, float(alpha), float(limit)


def quant_offsets(codec: ExpertCodec) -> list[int]:
    """The 8 part offsets ``CpuExpertPool.submit_quant`` reads in an expert's row: gate_up's codes, scales,
    zeros, bias, then down's (-1 where absent: MXFP4 has no zeros, only GPT-OSS has biases)."""
    off = {(p.kind, p.sub): p.offset for p in codec.parts}
    mx = codec.fmt.name == "mxfp4"
    out: list[int] = []
    for m in ("gate_up_proj", "down_proj"):
        out += [off[(m, "blocks" if mx else "q")], off[(m, "scales" if mx else "scale")],
                -1 if mx else off[(m, "zero")], off.get((m + "_bias", "raw"), -1)]
    return out


@torch.no_grad()
def reference_ffn(codec: ExpertCodec, row: torch.Tensor, x: torch.Tensor, act: int = ACT_SILU, alpha: float = 0.0,
                  limit: float = 0.0) -> torch.Tensor:
    """The specification of ``CppQuantKernel``, in float64: one expert's FFN on ``x`` ``(tokens, H)`` from its
    compressed ``row`` (``codec.slot_numel`` bytes), its weights dequantized by ``moecache.quant`` (fp32,
    rounded once to the compute dtype). ``act``: ``ACT_SILU`` (``down(silu(gate x) * up x)``, gate rows first)
    or ``ACT_GPT_OSS`` (interleaved rows, biases, ``(clamp(up) + 1) * g * sigmoid(alpha g)`` with
    ``g = min(gate, limit)``)."""
    views = codec.views(row.reshape(1, -1))
    kinds = {k.name: k for k in codec.kinds}

    def matrix(name: str) -> torch.Tensor:
        w = codec.expand_kind(views, name)[0]
        return (w.t() if kinds[name].transposed else w).double()

    gate_up, down = matrix("gate_up_proj"), matrix("down_proj")
    h = x.double() @ gate_up.t()
    if "gate_up_proj_bias" in kinds:
        h = h + codec.expand_kind(views, "gate_up_proj_bias")[0].double()
    if act == ACT_GPT_OSS:
        g, u = h[:, 0::2].clamp(max=limit), h[:, 1::2].clamp(-limit, limit)
        a = (u + 1) * g * torch.sigmoid(alpha * g)
    else:
        i = down.shape[1]
        a = torch.nn.functional.silu(h[:, :i]) * h[:, i:]
    out = a @ down.t()
    if "down_proj_bias" in kinds:
        out = out + codec.expand_kind(views, "down_proj_bias")[0].double()
    return out


def swiglu_mismatch(original: nn.Module, kinds: dict[str, tuple[int, ...]], dtype: torch.dtype) -> str | None:
    """None when ``original`` computes ``down(silu(gate x) * up x)`` from concatenated, non-transposed
    ``gate_up_proj (2I, H)`` and ``down_proj (H, I)`` without biases (what the C++ kernel does), else why not."""
    if set(kinds) != {"gate_up_proj", "down_proj"}:
        return f"its expert weights are {sorted(kinds)}, not gate_up_proj and down_proj"
    (two_i, h), (h2, i) = kinds["gate_up_proj"], kinds["down_proj"]
    if two_i != 2 * i or h2 != h:
        return f"gate_up_proj {kinds['gate_up_proj']} and down_proj {kinds['down_proj']} are not (2I, H) and (H, I)"
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    for flag, want in flags.items():
        if bool(getattr(original, flag, want)) != want:
            return f"its experts class sets {flag}={not want}"
    gate = getattr(type(original), "_apply_gate", None)
    if gate is None or getattr(gate, "__name__", "") != "_default_apply_gate":
        return "its experts class has its own gating function"
    from transformers.activations import SiLUActivation

    if not isinstance(getattr(original, "act_fn", None), (nn.SiLU, SiLUActivation)):
        return f"its activation is {type(getattr(original, 'act_fn', None)).__name__}, not SiLU"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"its weights are {dtype}; the C++ kernel reads bf16 or fp32"
    return None


class CpuKernel:
    """Runs experts of one layer on the host: ``submit`` returns at once (where it can), ``wait``
    returns the outputs ``(rows, H)`` (fp32 or the model dtype) and the kernel's ms."""

    name = "base"

    def submit(self, layer: int, experts: Sequence[int], x: torch.Tensor, sizes: Sequence[int]) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def experts_run(self) -> int:
        raise NotImplementedError

    def prewake(self) -> None:
        """A ``submit`` is coming: get ready (the C++ pool wakes its workers meanwhile)."""

    def close(self) -> None:
        pass


class CppKernel(CpuKernel):
    """``moecache._C.CpuExpertPool`` over the host store's rows (read in place)."""

    def __init__(self, store: Any, threads: int, kernel: str, pin: bool):
        C = extension()
        assert C is not None
        self._pool = C.CpuExpertPool(int(threads), kernel)
        self.name = self._pool.kernel()
        self.threads = int(self._pool.threads())
        kinds = {k.name: k.shape for k in store.layout.kinds}
        self.H, self.I = kinds["down_proj"]
        self.wtype = 1 if store.layout.dtype == torch.bfloat16 else 0
        self.pin = pin
        self.store = store  # keeps the rows alive while the pool may read them
        # Address of every expert's gate_up and down rows, by layer: [layer][expert].
        self._gu: list[list[int]] = []
        self._down: list[list[int]] = []
        for layer in range(store.num_layers):
            views = store.layer_views(layer)
            self._gu.append([views["gate_up_proj"][e].data_ptr() for e in range(store.num_experts)])
            self._down.append([views["down_proj"][e].data_ptr() for e in range(store.num_experts)])

    def submit(self, layer: int, experts: Sequence[int], x: torch.Tensor, sizes: Sequence[int]) -> Any:
        x32 = x.to(torch.float32).contiguous()  # the launch passes fp32 rows: no CPU op here
        out = torch.empty((x32.shape[0], self.H), dtype=torch.float32, pin_memory=self.pin)
        row = self.H * 4  # bytes of one fp32 row, in and out
        xs, outs, off = [], [], 0
        for n in sizes:
            xs.append(x32.data_ptr() + off * row)
            outs.append(out.data_ptr() + off * row)
            off += n
        ticket = self._pool.submit(self.H, self.I, self.wtype, xs, list(sizes),
                                   [self._gu[layer][e] for e in experts], [self._down[layer][e] for e in experts], outs)
        return ticket, x32, out  # the buffers live as long as the handle

    def wait(self, handle: Any) -> tuple[torch.Tensor, float]:
        ticket, _x, out = handle
        return out, float(self._pool.wait(ticket))

    def experts_run(self) -> int:
        return int(self._pool.counters()[1])

    def prewake(self) -> None:
        self._pool.prewake()

    def read_bandwidth(self, buf: torch.Tensor) -> float:
        """GB/s of a multi-threaded read of ``buf`` (contiguous host tensor) by this pool's threads."""
        ms, _ = self._pool.read(buf.data_ptr(), buf.numel() * buf.element_size())
        return buf.numel() * buf.element_size() / (ms * 1e6)

    def inject_fault(self, nth: int = 1) -> None:
        """Test hook: the pool's ``nth`` next task fails; its wait raises ``RuntimeError`` on the calling thread."""
        self._pool.inject_fault(int(nth))

    def close(self) -> None:
        self._pool.close()


class CppQuantKernel(CppKernel):
    """``moecache._C.CpuExpertPool`` over the host store's compressed rows (read in place, dequantized in
    registers; ``csrc/cpu_expert_quant.cpp``)."""

    def __init__(self, store: Any, threads: int, kernel: str, pin: bool, act: int, alpha: float, limit: float,
                 mode: str = QUANT_MODES[0]):
        C = extension()
        assert C is not None
        if mode not in QUANT_MODES:
            raise ConfigError(f"quant_mode={mode!r} is unknown; valid: {', '.join(QUANT_MODES)}")
        codec: ExpertCodec = store.layout
        self._pool = C.CpuExpertPool(int(threads), kernel)
        self.fast = mode == "fast"
        self.name = self._pool.quant_kernel(self.fast)
        self.threads = int(self._pool.threads())
        kinds = {k.name: k for k in codec.kinds}
        self.H, self.I = _matrix_shape(kinds["down_proj"])
        self.fmt = QUANT_FORMAT_CODES[codec.fmt.name]
        self.group = codec.fmt.group_size
        self.bf16 = codec.dense.dtype == torch.bfloat16
        self.act, self.alpha, self.limit = int(act), float(alpha), float(limit)
        self.offsets = quant_offsets(codec)
        self.pin = pin
        self.store = store  # keeps the rows alive while the pool may read them
        E = store.num_experts
        self._rows = [[store.row(layer * E + e).data_ptr() for e in range(E)] for layer in range(store.num_layers)]

    def submit(self, layer: int, experts: Sequence[int], x: torch.Tensor, sizes: Sequence[int]) -> Any:
        x32 = x.to(torch.float32).contiguous()
        out = torch.empty((x32.shape[0], self.H), dtype=torch.float32, pin_memory=self.pin)
        row = self.H * 4
        xs, outs, off = [], [], 0
        for n in sizes:
            xs.append(x32.data_ptr() + off * row)
            outs.append(out.data_ptr() + off * row)
            off += n
        ticket = self._pool.submit_quant(self.H, self.I, self.fmt, self.group, self.bf16, self.act, self.alpha,
                                         self.limit, self.offsets, xs, list(sizes),
                                         [self._rows[layer][e] for e in experts], outs, self.fast)
        return ticket, x32, out


class TorchKernel(CpuKernel):
    """The model's own experts class on host views of the store (any layout; runs on the calling
    thread, so it does not overlap the GPU's work as the C++ pool does)."""

    name = "torch"

    def __init__(self, originals: Sequence[nn.Module], store: Any, num_experts: int):
        self.originals = list(originals)
        self.store = store
        self.E = int(num_experts)
        # A compressed store: the experts asked for are expanded (moecache.quant, torch) before the call.
        self.codec = store.layout if isinstance(store.layout, ExpertCodec) else None
        self.dtype = store.layout.dtype if self.codec is None else self.codec.dense.dtype
        self._shells: dict[int, nn.Module] = {}
        self._run = 0

    def _shell(self, layer: int) -> nn.Module:
        if layer not in self._shells:
            self._shells[layer] = make_shell(self.originals[layer], self.store.layer_views(layer), self.E)
        return self._shells[layer]

    @torch.no_grad()
    def submit(self, layer: int, experts: Sequence[int], x: torch.Tensor, sizes: Sequence[int]) -> Any:
        t0 = time.perf_counter()
        x = x.to(self.dtype)
        if self.codec is None:
            shell, names = self._shell(layer), list(experts)
        else:
            codec = self.codec
            rows = torch.stack([self.store.row(layer * self.E + e) for e in experts])
            dense = torch.empty((len(experts), codec.dense.slot_numel), dtype=codec.dense.dtype)
            codec.expand_rows(rows, dense)
            shell, names = make_shell(self.originals[layer], codec.dense.views(dense), len(experts)), \
                list(range(len(experts)))
        ids = torch.repeat_interleave(torch.tensor(names, dtype=torch.long), torch.tensor(list(sizes)))
        # Each row as its own one-expert token with weight 1: the unweighted expert output.
        out = shell(x, ids.view(-1, 1), torch.ones((x.shape[0], 1), dtype=x.dtype))
        self._run += len(experts)
        return out, 1e3 * (time.perf_counter() - t0)

    def wait(self, handle: Any) -> tuple[torch.Tensor, float]:
        return handle

    def experts_run(self) -> int:
        return self._run


def make_kernel(kernel: str, threads: int | None, originals: Sequence[nn.Module], store: Any, num_experts: int,
                pin: bool, quant_mode: str = QUANT_MODES[0]) -> tuple[CpuKernel, str | None]:
    """The CPU kernel for this model (``kernel``: a ``CPU_KERNELS`` name; ``threads``: the C++ pool's
    threads, default ``default_threads()``; ``quant_mode``: a ``QUANT_MODES`` name, for compressed experts
    on the C++ kernel), and why it is the torch one (None when it is the C++ one)."""
    codec = store.layout if isinstance(store.layout, ExpertCodec) else None
    act, alpha, limit = ACT_SILU, 0.0, 0.0
    if kernel == "torch":
        why = "asked for (kernel torch)"
    elif extension() is None:
        why = "the extension moecache._C is not built or is disabled (MOECACHE_DISABLE_EXT)"
    elif codec is not None:
        why, act, alpha, limit = quant_mismatch(originals[0], codec)
    else:
        why = swiglu_mismatch(originals[0], {k.name: k.shape for k in store.layout.kinds}, store.layout.dtype)
    if why is None:
        if codec is not None:
            return CppQuantKernel(store, threads or default_threads(), kernel, pin, act, alpha, limit, quant_mode), None
        return CppKernel(store, threads or default_threads(), kernel, pin), None
    return TorchKernel(originals, store, num_experts), why
