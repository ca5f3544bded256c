"""Compressed expert formats: int8 and int4 group-wise, and GPT-OSS's MXFP4 as its checkpoints store it.

One definition of every format, shared by the host store, the pool, the expansion, the CPU kernels'
reference, the simulator's byte counts and the quality benchmark.

Matrices. An expert weight kind with a 2-D per-expert shape is a matrix; its *input dimension* is
the one its product reduces over (the last one, or the first for transposed layouts such as
GPT-OSS's ``(hidden, 2 * intermediate)``). Every format views the matrix as ``(out, in)`` and cuts
each row into groups of ``group_size`` consecutive inputs. Other kinds (biases) stay in the compute
dtype, byte for byte.

Integer formats (``int8``, ``int4``), asymmetric, one fp16 ``scale`` and one uint8 ``zero`` per group::

    w = float32(q - zero) * float32(scale)        (one fp32 rounding; q - zero is an exact integer)
    w_compute = w.to(compute dtype)               (rounded once, to nearest even)

``int8`` stores ``q`` as one byte; ``int4`` packs two per byte *within a group*: byte ``j`` of a group
holds ``q[j]`` in its low nibble and ``q[j + group_size/2]`` in its high nibble, so a SIMD kernel
unpacks a group as two contiguous halves.

MXFP4 (OCP microscaling, as GPT-OSS stores ``*_blocks`` / ``*_scales``): groups of 32, one e8m0
exponent byte per group, two e2m1 values per byte (low nibble = even element)::

    w = FP4[nibble] * 2 ** (scale - 127)          (exact in fp32), then rounded to the compute dtype

``ExpertCodec`` lays out one expert as ONE contiguous byte row: each part (q, scales, zeros, or a raw
bias) at an offset aligned to ``ALIGN_BYTES``, so that one copy moves one expert and every part is a
view. ``quantize_matrix`` chooses the integer parameters: per group it searches clipping of the
range and refits the scale (least squares, optionally weighted by the input channels' mean squared
activation from calibration text), keeping whatever lowers the group's (weighted) squared error;
round-to-nearest over the full range is one of the candidates, so it is never worse than it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, UnsupportedModelError

#: Alignment of every part's offset and of the row stride, in bytes (as the dense slot layout).
ALIGN_BYTES = 256
#: Group sizes the integer formats accept.
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
#: The quantized formats; "auto" and the float dtype names mean "keep the model's own".
QUANT_FORMATS = ("int8", "int4", "mxfp4")
FLOAT_FORMATS = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
#: e2m1 code -> value (sign in bit 3).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32


def _align(n: int, to: int = ALIGN_BYTES) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class ExpertFormat:
    """A compressed format: ``name`` in ``QUANT_FORMATS`` and its group size along the input dimension."""

    name: str
    group_size: int

    @property
    def bits(self) -> int:
        return 8 if self.name == "int8" else 4

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def matrix_parts(self, out: int, inp: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The parts of one ``(out, in)`` matrix: (suffix, shape, dtype)."""
        groups = inp // self.group_size
        if self.name == "mxfp4":
            return [("blocks", (out, groups, self.group_size // 2), torch.uint8), ("scales", (out, groups), torch.uint8)]
        qcols = inp if self.name == "int8" else inp // 2
        return [("q", (out, qcols), torch.uint8), ("scale", (out, groups), torch.float16),
                ("zero", (out, groups), torch.uint8)]

    def bits_per_weight(self) -> float:
        extra = 8 if self.name == "mxfp4" else 24  # per group: e8m0 byte, or fp16 scale + uint8 zero
        return self.bits + extra / self.group_size

    def describe(self) -> str:
        return f"{self.name}" + ("" if self.name == "mxfp4" else f" g{self.group_size}")


def resolve_format(expert_dtype: str | None, group_size: int | None, *, checkpoint_format: str | None = None
                   ) -> ExpertFormat | None:
    """The compressed format asked for, or None to keep the experts' floating-point weights.

    ``checkpoint_format``: "mxfp4" where the checkpoint's experts are stored so (GPT-OSS), else None.
    Raises ``ConfigError`` for an unknown name, a bad group size, or a quantized checkpoint asked for
    another format. Shapes are checked later by ``ExpertCodec`` (``check_divides``).
    """
    name = "auto" if expert_dtype is None else str(expert_dtype).lower()
    valid = ", ".join(("auto",) + QUANT_FORMATS + ("bf16", "fp16", "fp32"))
    if name not in QUANT_FORMATS and name not in FLOAT_FORMATS and name != "auto":
        raise ConfigError(f"unknown expert_dtype {expert_dtype!r}; valid: {valid}")
    if name == "auto":
        name = checkpoint_format or "float"
    if checkpoint_format == "mxfp4" and name != "mxfp4":
        raise ConfigError(f"this checkpoint's experts are stored in MXFP4; expert_dtype={expert_dtype!r} would "
                          "re-quantize them: use expert_dtype='auto' (or 'mxfp4')")
    if name == "mxfp4":
        if checkpoint_format != "mxfp4":
            raise ConfigError("expert_dtype='mxfp4' keeps a checkpoint's own MXFP4 experts (GPT-OSS); this model's "
                              "experts are not MXFP4: use 'int4' or 'int8'")
        if group_size not in (None, MXFP4_GROUP):
            raise ConfigError(f"MXFP4 has groups of {MXFP4_GROUP}; drop group_size={group_size}")
        return ExpertFormat("mxfp4", MXFP4_GROUP)
    if name not in QUANT_FORMATS:
        if group_size is not None:
            raise ConfigError(f"group_size={group_size} applies to int8/int4 experts; expert_dtype is {name!r}")
        return None
    g = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g not in GROUP_SIZES:
        raise ConfigError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    return ExpertFormat(name, g)


# -- the arithmetic --------------------------------------------------------------------------------------

def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(out, in/2)`` uint8 packed per group (module docstring) -> ``(out, in)`` uint8 codes 0..15."""
    out, half_cols = packed.shape
    g = packed.view(out, -1, group_size // 2)
    return torch.cat([g & 0xF, g >> 4], dim=-1).view(out, half_cols * 2)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    out, cols = q.shape
    g = q.view(out, cols // group_size, group_size).to(torch.uint8)
    half = group_size // 2
    return (g[..., :half] | (g[..., half:] << 4)).reshape(out, cols // 2)


def _fp4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)


def dequantize_matrix(parts: dict[str, torch.Tensor], fmt: ExpertFormat, dtype: torch.dtype) -> torch.Tensor:
    """The ``(out, in)`` matrix in ``dtype`` (fp32 first, rounded once; module docstring). Any device."""
    g = fmt.group_size
    if fmt.name == "mxfp4":
        blocks, scales = parts["blocks"], parts["scales"]
        out, groups, half = blocks.shape
        lut = _fp4_table(blocks.device)
        codes = torch.stack([blocks & 0xF, blocks >> 4], dim=-1).view(out, groups, 2 * half)
        vals = lut[codes.long()]
        exp = scales.to(torch.int32) - 127
        w = torch.ldexp(vals, exp.unsqueeze(-1).to(torch.float32))
        return w.view(out, groups * 2 * half).to(dtype)
    q = parts["q"]
    codes = q if fmt.name == "int8" else unpack_int4(q, g)
    out, inp = codes.shape
    centred = codes.view(out, inp // g, g).to(torch.float32) - parts["zero"].to(torch.float32).unsqueeze(-1)
    w = centred * parts["scale"].to(torch.float32).unsqueeze(-1)
    return w.view(out, inp).to(dtype)


#: Clipping candidates: each group's range [min, max] is shrunk to [a * min, b * max] for a, b in these.
CLIP_GRID = {"int4": (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7), "int8": (1.0, 0.97, 0.94, 0.9)}
#: Least-squares refits of the scale after the grid (each re-rounds the codes).
REFITS = 2
#: The clipping search quantizes a matrix this many weights at a time (whole rows), so its fp32 temporaries stay
#: a few times this size however large the matrix (loading streams experts through it).
ROW_CHUNK_ELEMENTS = 1 << 18


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax)


def _err(w: torch.Tensor, imp: torch.Tensor | None, q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor
         ) -> torch.Tensor:
    d = w - (q - zero) * scale
    d = d * d
    return (d if imp is None else d * imp).sum(-1)


def _to_scale(s: torch.Tensor) -> torch.Tensor:
    """The scale as it will be stored (fp16, at least its smallest normal) and read back in fp32."""
    return s.clamp(min=2.0 ** -14, max=60000.0).to(torch.float16).to(torch.float32)


def _group_params(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and zero of ``(..., g)`` groups over their full range."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = _to_scale((hi - lo) / qmax)
    return s, torch.clamp(torch.round(-lo / s), 0, qmax)


def _clipped_group_params(x: torch.Tensor, diag: torch.Tensor, fmt: ExpertFormat
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of ``(out, g)`` groups from the clipping grid, minimising the squared error weighted by
    the Hessian's diagonal (each input channel's mean squared activation)."""
    qmax = fmt.qmax
    w = diag.clamp(min=0).view(1, -1)
    wmin, wmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    best = None
    for a in CLIP_GRID[fmt.name]:
        for b in CLIP_GRID[fmt.name]:
            s = _to_scale((wmax * b - wmin * a) / qmax)
            z = torch.clamp(torch.round(-wmin * a / s), 0, qmax)
            e = _err(x, w, _codes(x, s, z, qmax), z, s)
            if best is None:
                best = [e, s, z]
            else:
                better = (e < best[0]).unsqueeze(-1)
                best = [torch.minimum(e, best[0]), torch.where(better, s, best[1]), torch.where(better, z, best[2])]
    return best[1], best[2]


#: GPTQ's damping of the Hessian's diagonal (fraction of its mean) and its column block.
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128


@torch.no_grad()
def _gptq(w: torch.Tensor, hessian: torch.Tensor, fmt: ExpertFormat) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """GPTQ (Frantar et al., 2022) with asymmetric groups along the input dimension, in input order: each
    column is rounded with its group's scale and zero (fixed from the error-updated weights when the group
    starts), and its rounding error is spread over the columns not yet rounded through the inverse Hessian
    of the layer's inputs (``hessian`` = mean of x x^T over calibration tokens). Returns codes, scales, zeros."""
    out, inp = w.shape
    g, qmax = fmt.group_size, fmt.qmax
    W = w.to(torch.float32).clone()
    H = hessian.to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(inp, device=W.device) * (GPTQ_DAMP * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    Q = torch.empty((out, inp), dtype=torch.float32, device=W.device)
    S = torch.empty((out, inp // g), dtype=torch.float32, device=W.device)
    Z = torch.empty_like(S)
    for b0 in range(0, inp, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, inp)
        W1 = W[:, b0:b1].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % g == 0:  # g divides the block: the group is inside it
                sc, ze = _clipped_group_params(W1[:, j:j + g], torch.diag(H)[col:col + g], fmt)
                S[:, col // g], Z[:, col // g] = sc[:, 0], ze[:, 0]
                s_cur, z_cur = sc[:, 0], ze[:, 0]
            wcol = W1[:, j]
            q = torch.clamp(torch.round(wcol / s_cur) + z_cur, 0, qmax)
            Q[:, col] = q
            err = (wcol - (q - z_cur) * s_cur) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            E1[:, j] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return Q, S, Z


@torch.no_grad()
def quantize_matrix(w: torch.Tensor, fmt: ExpertFormat, importance: torch.Tensor | None = None,
                    search: bool = True) -> dict[str, torch.Tensor]:
    """Integer parts of an ``(out, in)`` matrix.

    ``importance``: ``(in, in)``, the mean ``x x^T`` of the matrix's inputs over calibration text: GPTQ
    (``_gptq``); ``(in,)``: non-negative weights of each input channel's squared error for the clipping
    search; None: the search on plain squared weight error. ``search=False`` without a Hessian is plain
    round-to-nearest."""
    if fmt.name == "mxfp4":
        raise ConfigError("MXFP4 experts are kept as the checkpoint stores them; moecache does not quantize to it")
    out, inp = w.shape
    rows = max(1, ROW_CHUNK_ELEMENTS // inp)
    if out > rows and (importance is None or importance.dim() == 1):
        # Groups are independent: a block of rows at a time gives the same parts with bounded fp32 temporaries.
        chunks = [quantize_matrix(w[r:r + rows], fmt, importance, search) for r in range(0, out, rows)]
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    if importance is not None and importance.dim() == 2:
        q, sc, ze = _gptq(w, importance, fmt)
        q = q.to(torch.uint8)
        return {"q": q if fmt.name == "int8" else pack_int4(q, fmt.group_size),
                "scale": sc.to(torch.float16), "zero": ze.to(torch.uint8)}
    g, qmax = fmt.group_size, fmt.qmax
    x = w.detach().to(torch.float32).reshape(out, inp // g, g)
    imp = None
    if importance is not None:
        imp = importance.detach().to(torch.float32, copy=True).to(x.device).clamp(min=0)
        imp = (imp / imp.mean().clamp(min=1e-30) + 1e-6).view(1, inp // g, g)
    wmin, wmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    best_err = best_s = best_z = None
    grid = CLIP_GRID[fmt.name] if search else (1.0,)
    for a in grid:
        for b in grid:
            lo, hi = wmin * a, wmax * b
            s = _to_scale((hi - lo) / qmax)
            z = torch.clamp(torch.round(-lo / s), 0, qmax)
            e = _err(x, imp, _codes(x, s, z, qmax), z, s)
            if best_err is None:
                best_err, best_s, best_z = e, s, z
            else:
                better = (e < best_err).unsqueeze(-1)
                best_err = torch.minimum(e, best_err)
                best_s = torch.where(better, s, best_s)
                best_z = torch.where(better, z, best_z)
    if search:
        for _ in range(REFITS):
            q = _codes(x, best_s, best_z, qmax)
            c = q - best_z
            cw = c if imp is None else c * imp
            num, den = (cw * x).sum(-1, keepdim=True), (cw * c).sum(-1, keepdim=True)
            s = _to_scale(torch.where(den > 0, num / den.clamp(min=1e-30), best_s).abs())
            e = _err(x, imp, _codes(x, s, best_z, qmax), best_z, s)
            better = (e < best_err).unsqueeze(-1)
            best_err = torch.minimum(e, best_err)
            best_s = torch.where(better, s, best_s)
    q = _codes(x, best_s, best_z, qmax).to(torch.uint8).view(out, inp)
    parts = {"q": q if fmt.name == "int8" else pack_int4(q, g),
             "scale": best_s.squeeze(-1).to(torch.float16), "zero": best_z.squeeze(-1).to(torch.uint8)}
    return parts


# -- one expert as one byte row ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One part of the compressed row: of kind ``kind`` (``sub``: q/scale/zero/blocks/scales, or "raw")."""

    kind: str
    sub: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes
    nbytes: int


@dataclass(frozen=True)
class KindInfo:
    """How one weight kind of the dense layout is held: ``matrix`` (quantized) or raw bytes."""

    name: str
    shape: tuple[int, ...]
    matrix: bool
    transposed: bool  # the stored per-expert shape is (in, out)


class ExpertCodec:
    """The compressed row of one expert for a dense ``SlotLayout`` (``moecache.runtime.layout``) and a format.

    It duck-types the parts of ``SlotLayout`` that the host store, the pool and the copy engines read
    (``dtype`` uint8, ``slot_numel`` = bytes per expert, ``views``, ``param_refs``, ``release``), and
    adds ``encode`` / ``expand``. ``dense`` is the layout of the expanded experts (compute dtype).
    """

    def __init__(self, dense: Any, fmt: ExpertFormat, transposed: bool = False, where: str = "experts"):
        self.dense = dense
        self.fmt = fmt
        self.storage = dense.storage
        kinds, parts, off = [], [], 0
        for k in dense.kinds:
            matrix = len(k.shape) == 2 and not k.name.endswith("bias")
            kinds.append(KindInfo(k.name, k.shape, matrix, transposed and matrix))
            if matrix:
                out, inp = (k.shape[1], k.shape[0]) if transposed else k.shape
                if inp % fmt.group_size:
                    raise ConfigError(f"{where}.{k.name}: input dimension {inp} is not a multiple of group_size="
                                      f"{fmt.group_size}; use a group size that divides it "
                                      f"({', '.join(str(g) for g in GROUP_SIZES if inp % g == 0) or 'none fits'})")
                if fmt.name == "int4" and fmt.group_size % 2:
                    raise ConfigError("int4 needs an even group size")
                for sub, shape, dt in fmt.matrix_parts(out, inp):
                    n = _numel(shape) * _elem(dt)
                    parts.append(Part(k.name, sub, shape, dt, off, n))
                    off = _align(off + n)
            else:
                n = k.numel * _elem(dense.dtype)
                parts.append(Part(k.name, "raw", k.shape, dense.dtype, off, n))
                off = _align(off + n)
        if not any(ki.matrix for ki in kinds):
            raise UnsupportedModelError(f"{where}: no 2-D expert weights to compress; use expert_dtype='auto'")
        self.kinds = tuple(kinds)
        self.parts = tuple(parts)
        self.slot_numel = max(off, ALIGN_BYTES)
        self.dtype = torch.uint8

    # -- SlotLayout's interface -----------------------------------------------------------------------------
    element_size = 1

    @property
    def slot_bytes(self) -> int:
        return self.slot_numel

    @property
    def names(self) -> tuple[str, ...]:
        return self.dense.names

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertCodec) and (self.dense, self.fmt, self.parts) == (other.dense, other.fmt,
                                                                                         other.parts)

    def __hash__(self) -> int:
        return hash((self.dense, self.fmt))

    def check_same(self, other: Any, where: str) -> None:
        self.dense.check_same(getattr(other, "dense", other), where)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-part views ``(n, *shape)`` of a ``(n, slot_numel)`` uint8 buffer, keyed ``kind/sub``."""
        if flat.dim() != 2 or flat.shape[1] != self.slot_numel or flat.dtype != torch.uint8:
            raise ValueError(f"expected a (n, {self.slot_numel}) uint8 buffer, got {tuple(flat.shape)} {flat.dtype}")
        n = flat.shape[0]
        out = {}
        for p in self.parts:
            raw = flat[:, p.offset:p.offset + p.nbytes]
            out[f"{p.kind}/{p.sub}"] = raw.view(p.dtype).view(n, *p.shape)
        return out

    def param_refs(self, experts: torch.nn.Module, num_experts: int, where: str = "experts") -> list:
        return self.dense.param_refs(experts, num_experts, where)

    def release(self, experts: torch.nn.Module, num_experts: int) -> list:
        return self.dense.release(experts, num_experts)

    def describe(self) -> dict[str, object]:
        return {"format": self.fmt.describe(), "slot_bytes": self.slot_bytes, "dense_slot_bytes": self.dense.slot_bytes,
                "kinds": {k.name: list(k.shape) for k in self.kinds}}

    # -- encode / expand ------------------------------------------------------------------------------------
    def _as_matrix(self, ki: KindInfo, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(-1, -2) if ki.transposed else w

    @torch.no_grad()
    def encode_kind(self, rows: dict[str, torch.Tensor], name: str, value: torch.Tensor,
                    importance: torch.Tensor | None = None, search: bool = True) -> None:
        """Write kind ``name`` of ONE expert (its dense per-expert shape, any float dtype) into ``rows``
        (this expert's part views, e.g. ``views(row[None])`` squeezed or ``views(block)[i]``)."""
        ki = next(k for k in self.kinds if k.name == name)
        if not ki.matrix:
            rows[f"{name}/raw"].copy_(value.reshape(rows[f"{name}/raw"].shape))
            return
        # The search and GPTQ are arithmetic-bound: on a CUDA machine they run on the GPU (same ops, same codes
        # up to the device's rounding of the error sums used to compare candidates).
        work = torch.device("cuda") if torch.cuda.is_available() else value.device
        parts = quantize_matrix(self._as_matrix(ki, value.to(work)), self.fmt,
                                None if importance is None else importance.to(work), search)
        for sub, t in parts.items():
            rows[f"{name}/{sub}"].copy_(t)

    def set_native(self, rows: dict[str, torch.Tensor], name: str, **parts: torch.Tensor) -> None:
        """Write an already-compressed kind (MXFP4 ``blocks``/``scales`` as the checkpoint has them)."""
        for sub, t in parts.items():
            dst = rows[f"{name}/{sub}"]
            dst.copy_(t.reshape(dst.shape))

    def expand_kind(self, views: dict[str, torch.Tensor], name: str, dtype: torch.dtype | None = None
                    ) -> torch.Tensor:
        """Kind ``name`` of ``n`` experts, ``(n, *dense shape)`` in ``dtype`` (default: the dense layout's), from
        per-part views with a leading expert dimension. Runs on the views' device."""
        ki = next(k for k in self.kinds if k.name == name)
        dtype = dtype or self.dense.dtype
        if not ki.matrix:
            return views[f"{name}/raw"].to(dtype)
        subs = {p.sub: views[f"{name}/{p.sub}"] for p in self.parts if p.kind == name}
        n = next(iter(subs.values())).shape[0]
        mats = []
        for i in range(n):
            m = dequantize_matrix({s: t[i] for s, t in subs.items()}, self.fmt, dtype)
            mats.append(m.transpose(0, 1) if ki.transposed else m)
        return torch.stack(mats)

    @torch.no_grad()
    def expand_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Expand ``(n, slot_numel)`` compressed rows into ``(n, dense.slot_numel)`` dense rows (same device)."""
        views = self.views(src)
        dense_views = self.dense.views(dst)
        for ki in self.kinds:
            dense_views[ki.name].copy_(self.expand_kind(views, ki.name))

    @torch.no_grad()
    def pack(self, experts: torch.nn.Module, num_experts: int, views: dict[str, torch.Tensor],
             importance: dict[str, torch.Tensor] | None = None) -> None:
        """Quantize every expert of ``experts`` (dense, any device) into one layer's part ``views``."""
        dense_views: dict[str, torch.Tensor] = {}
        for ref in self.dense.param_refs(experts, num_experts):
            full = ref.param.detach()
            shape = next(k.shape for k in self.kinds if k.name == ref.kind)
            if ref.expert is None:
                dense_views[ref.kind] = full.reshape(num_experts, *shape)
            else:
                dense_views.setdefault(ref.kind, [None] * num_experts)[ref.expert] = full.reshape(shape)  # type: ignore
        for e in range(num_experts):
            rows = {k: v[e] for k, v in views.items()}
            for ki in self.kinds:
                imp = None if importance is None else importance.get(ki.name, {}).get(e)  # type: ignore[union-attr]
                self.encode_kind(rows, ki.name, dense_views[ki.name][e], imp)

    def restore(self, experts: torch.nn.Module, num_experts: int, views: dict[str, torch.Tensor],
                saved: list) -> None:
        """Put dense parameters back (the dequantized weights: the compressed store is all that is kept)."""
        dense = {ki.name: self.expand_kind(views, ki.name) for ki in self.kinds}
        self.dense.restore(experts, num_experts, dense, saved)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@torch.no_grad()
def quantize_dequantize_(model: torch.nn.Module, fmt: ExpertFormat, *, family: str | None = None,
                         importance: dict[int, dict[str, dict[int, torch.Tensor]]] | None = None,
                         search: bool = True) -> torch.nn.Module:
    """Replace every routed expert weight of ``model`` in place by its quantize-dequantize image under ``fmt``:
    the model the offloaded runtime computes with this format (the reference of the exactness tests and of
    the quality benchmark). ``importance[moe_layer][kind][expert]``: calibration weights (``quantize_matrix``)."""
    from .families import detect_family, find_moe_blocks, get_family
    from .runtime.layout import SlotLayout

    adapter = get_family(family) if family else detect_family(model)
    blocks = find_moe_blocks(model, adapter)
    E = adapter.num_experts(model.config)
    for li, b in enumerate(blocks):
        layout = SlotLayout.from_module(b.experts, E, b.name, adapter.layout)
        codec = ExpertCodec(layout, fmt, bool(getattr(adapter.layout, "transposed", False)), b.name)
        buf = torch.zeros((E, codec.slot_numel), dtype=torch.uint8)
        views = codec.views(buf)
        codec.pack(b.experts, E, views, None if importance is None else importance.get(li))
        dense = {ki.name: codec.expand_kind(views, ki.name) for ki in codec.kinds}
        for ref in layout.param_refs(b.experts, E):
            src = ref.target(dense)
            ref.param.data.copy_(src.reshape(ref.param.shape).to(ref.param.dtype))
    return model


__all__ = ["ExpertFormat", "ExpertCodec", "resolve_format", "quantize_matrix", "dequantize_matrix", "pack_int4",
           "unpack_int4", "quantize_dequantize_", "QUANT_FORMATS", "GROUP_SIZES", "FP4_VALUES"]


# -- calibration ---------------------------------------------------------------------------------------------

@torch.no_grad()
def collect_importance(model: torch.nn.Module, chunks: list[list[int]], *, family: str | None = None,
                       hessian: bool = True) -> dict[int, dict[str, dict[int, torch.Tensor]]]:
    """Second moments of every expert matrix's inputs over calibration ``chunks`` (token id lists, one forward
    each): ``[moe_layer][kind][expert]`` -> the mean ``x x^T`` ``(in, in)`` (``hessian``, for GPTQ) or the mean
    ``x * x`` ``(in,)``, fp32, for ``quantize_matrix``.
    Reads transformers' experts modules (``use_experts_implementation``: ``gate_up_proj`` then
    ``_apply_gate`` then ``down_proj``); experts that saw no token get none (plain weight error)."""
    import torch.nn.functional as F

    from .families import detect_family, find_moe_blocks, get_family

    adapter = get_family(family) if family else detect_family(model)
    blocks = find_moe_blocks(model, adapter)
    sums: dict[int, dict[str, dict[int, torch.Tensor]]] = {i: {"gate_up_proj": {}, "down_proj": {}}
                                                           for i in range(len(blocks))}
    counts: dict[int, dict[int, int]] = {i: {} for i in range(len(blocks))}
    hooks = []

    def make_hook(li: int):
        def hook(mod, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x_all = hidden.reshape(-1, hidden.shape[-1]).float()
            transposed = bool(getattr(mod, "is_transposed", False))
            for e in torch.unique(idx).tolist():
                if e < 0 or e >= mod.num_experts:
                    continue
                tok = (idx == e).any(-1).nonzero().squeeze(-1)
                x = x_all[tok]
                w1 = mod.gate_up_proj[e].float()
                h = x @ w1 if transposed else F.linear(x, w1)
                if getattr(mod, "gate_up_proj_bias", None) is not None:
                    h = h + mod.gate_up_proj_bias[e].float()
                act = mod._apply_gate(h)
                s = sums[li]
                act = act.float()
                s["gate_up_proj"][e] = s["gate_up_proj"].get(e, 0) + (x.T @ x if hessian else (x * x).sum(0))
                s["down_proj"][e] = s["down_proj"].get(e, 0) + (act.T @ act if hessian else (act * act).sum(0))
                counts[li][e] = counts[li].get(e, 0) + x.shape[0]
        return hook

    for li, b in enumerate(blocks):
        if not hasattr(b.experts, "_apply_gate"):
            raise UnsupportedModelError(f"{b.name}: calibration reads transformers' experts modules only")
        hooks.append(b.experts.register_forward_pre_hook(make_hook(li), with_kwargs=True))
    try:
        dev = next(model.parameters()).device
        for ids in chunks:
            model(torch.tensor([ids], device=dev))
    finally:
        for h in hooks:
            h.remove()
    return {li: {k: {e: v / counts[li][e] for e, v in d.items()} for k, d in kinds.items()}
            for li, kinds in sums.items()}
