"""``hidden_state``: a small learned network reads the residual stream at layer ``l`` and predicts the
experts of layer ``l + d`` (in the manner of ProMoE's learned predictors).

Input, per row and ``(d, l)`` with target layer ``t = (l + d) % L`` (of the next token when
``l + d >= L``: the last layers' residual stream already encodes the next token, so these targets
are learned too, not left to a fallback):

* ``x_l = [h_l ; hot_l]``: layer ``l``'s input hidden state (what its router reads: the residual
  stream after the layer's pre-MoE norm, ``hidden_size`` wide) and the multi-hot of the experts it chose;
* ``y_t = [h_t ; hot_t]``: the most recent observation at the target layer ``t`` in this request:
  the previous token's when ``t`` is in the current token, the current token's when ``t`` is in the
  next one; zeros (and no bias) for the first token of a request, which has none.

For every ``(d, l)``, ``d <= max_depth``, one two-layer perceptron with a linear skip maps them to a
score per expert::

    z = relu(Wx x_l + [y_t present] (Wy y_t + by) + b1)      (hidden_units wide, inputs standardised)
    logits = W2 z + b2 + Sx x_l + [y_t present] (Sy y_t + b2y)  (the skip: linear_skip=True)
    scores = sigmoid(logits);  prediction = normalise(scores)

The skip lets the linear part of the map (the next router read through this layer's residual
stream, the target layer's last routing) be learned directly, so the hidden units only carry the
rest; ``linear_skip=False`` drops it (``Sx = Sy = 0``).

The network is trained with binary cross-entropy on the 0/1 "selected" targets plus a listwise term (the softmax
cross-entropy of the selected set, which ranks the top-k), Adam with a one-cycle schedule,
``epochs`` passes over at most ``max_samples`` samples per ``(d, l)``, seeded, so a fit is
repeatable on one machine.

Hot path (the runtime's per-layer call): the standardisation is folded into the weights after
training, and every product that involves one observation is fused into ONE float32
vector-matrix product per row in ``observe``: ``x_l`` times the columns of every ``Wx[d, l]`` and
of every ``Wy[d, l']`` that will later read layer ``l`` as its target (``l' = (l - d) mod L``),
then those of the skips ``Sx[d, l]`` and ``Sy[d, l']``, pre-transposed side by side. ``predict`` then adds the stored parts, applies the ReLU, one small
``hidden_units x E`` product and adds the stored skip parts. Plain numpy, no torch op. Rows are multiplied one at a time, so a
row's answer does not depend on how many rows share the call (a matrix product's summation order
would), and batch 1 is the same code as batch ``n``.

Fitting needs a trace with hidden states (format version 2: ``moecache.record(model, path,
hidden_states=True)``) and torch (the runtime's own dependency). A row observed without a hidden
state (or a trace without them at prediction time) gets the target layer's prior. Where it runs:
on the host, in the runtime's per-layer predictor call; the runtime hands it the MoE block's input,
so on a GPU that is one device-to-host copy of ``hidden_size`` values per row and layer (a host
sync, as for ``gate_lookahead``). Trace-only predictors remain the defaults where no hidden states
exist; the simulator refuses predictors that read hidden states (a routing trace has none).

Tie-break: equal scores give equal probabilities; consumers take the lowest expert id first.
Cost per row and layer: one ``(hidden + E) x (2 * max_depth * (hidden_units + E))`` product in
``observe`` (``2 * max_depth * hidden_units`` columns without the skip), one ``hidden_units x E``
product per ``predict``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import PREDICTORS
from ._common import StreamPredictor, ahead_in_sequence, check_trace, layer_prior, multi_hot, token_order


def host_float32(hidden: Any) -> np.ndarray:
    """A torch tensor as a float32 numpy array on the host, with no torch compute op on the CPU (one
    would wake torch's OpenMP threads, which then spin on the hybrid CPU kernel's cores): a device tensor
    is cast there and copied (the host sync), a bfloat16 CPU tensor is widened in numpy from its bits."""
    import torch

    t = hidden.detach()
    if t.device.type != "cpu":
        t = t.float().cpu()
    if t.dtype == torch.bfloat16:  # bfloat16 is the top half of a float32
        return (t.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return t.numpy().astype(np.float32, copy=False)


@PREDICTORS.register("hidden_state", "a small network on the residual stream at layer l predicts layer l+d "
                                     "(fitted on a trace recorded with hidden states)")
class HiddenStatePredictor(StreamPredictor):
    """Params: ``max_depth`` (2), ``hidden_units`` (128), ``epochs`` (6), ``lr`` (4e-3), ``weight_decay``
    (1e-4), ``batch`` (1024), ``max_samples`` (160000), ``seed`` (0), ``linear_skip`` (True: the
    linear skip from both inputs to the logits)."""

    name = "hidden_state"
    needs_fit = True
    needs_model = True  # reads hidden states: runtime (and predict_eval with hidden=...), never a routing trace
    fit_hint = ("it learns from hidden states: record a trace with moecache.record(model, path, hidden_states=True), "
                "fit HiddenStatePredictor(L, E, top_k).fit(open_trace(path)) (or Predictor.load a saved one) and "
                "pass that instance as predictor=")

    def __init__(self, num_layers: int, num_experts: int, top_k: int, max_depth: int = 2, hidden_units: int = 128,
                 epochs: int = 6, lr: float = 4e-3, weight_decay: float = 1e-4, batch: int = 1024,
                 max_samples: int = 160000, seed: int = 0, linear_skip: bool = True):
        if not isinstance(linear_skip, (bool, np.bool_)):
            raise ConfigError(f"hidden_state: linear_skip must be True or False, got {linear_skip!r}")
        super().__init__(num_layers, num_experts, top_k, max_depth=int(max_depth), hidden_units=int(hidden_units),
                         epochs=int(epochs), lr=float(lr), weight_decay=float(weight_decay), batch=int(batch),
                         max_samples=int(max_samples), seed=int(seed), linear_skip=bool(linear_skip))
        if max_depth < 1 or hidden_units < 1 or epochs < 1 or lr <= 0 or weight_decay < 0 or batch < 1 \
                or max_samples < 2:
            raise ConfigError(f"hidden_state: need max_depth, hidden_units, epochs, batch >= 1, lr > 0, weight_decay "
                              f">= 0, max_samples >= 2; got {max_depth}, {hidden_units}, {epochs}, {batch}, {lr}, "
                              f"{weight_decay}, {max_samples}")
        self.max_depth, self.hidden_units, self.epochs = int(max_depth), int(hidden_units), int(epochs)
        self.lr, self.weight_decay, self.batch = float(lr), float(weight_decay), int(batch)
        self.max_samples, self.seed, self.linear_skip = int(max_samples), int(seed), bool(linear_skip)
        self.prior = np.full((num_layers, num_experts), top_k / num_experts)
        # fitted, standardisation folded in (D = max_depth, U = hidden_units, F = hidden_size + E):
        # (L, F, 2 * D * (U + E)): [Wx[d, l] for d | Wy[d, (l - d) % L] for d | Sx[d, l] for d | Sy[d, (l - d) % L]
        # for d]; without the skip (L, F, 2 * D * U), the first two parts
        self.w_fused: np.ndarray | None = None
        self.b1: np.ndarray | None = None  # (D, L, U): bias of z, always added
        self.by: np.ndarray | None = None  # (D, L, U): bias of the y part, added where y_t is present
        self.w2: np.ndarray | None = None  # (D, L, U, E)
        self.b2: np.ndarray | None = None  # (D, L, E): always added (the x skip's part included)
        self.b2y: np.ndarray | None = None  # (D, L, E): the y skip's bias, added where y_t is present
        # per request: layer -> (rows, 2 * D * U), x_layer times w_fused[layer] for that layer's latest
        # observation (its own columns, and those the perceptrons reading it as their target add)
        self._z: list[np.ndarray | None] = [None] * num_layers
        self._x: np.ndarray | None = None  # (rows, F) input buffer
        self._b1y: np.ndarray | None = None  # (D, L, U): b1 + by
        self._b2y: np.ndarray | None = None  # (D, L, E): b2 + b2y

    @property
    def hidden_size(self) -> int | None:
        return None if self.w_fused is None else self.w_fused.shape[1] - self.num_experts

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, trace: Any) -> "HiddenStatePredictor":
        import torch
        from tqdm.auto import tqdm

        check_trace(trace, self.num_layers, self.num_experts, self.top_k, "hidden_state.fit")
        hidden = getattr(trace, "hidden", None)
        if hidden is None:
            raise ConfigError("hidden_state.fit needs a trace with hidden states: record one with "
                              "moecache.record(model, path, hidden_states=True)")
        L, E, D, U = self.num_layers, self.num_experts, self.max_depth, self.hidden_units
        self.prior = layer_prior(trace, 1.0) * self.top_k
        order, next_same = token_order(trace)
        ids = np.asarray(trace.ids)[order]
        hot = multi_hot(ids, E).astype(np.float32)  # (n, L, E)
        hid = np.asarray(hidden)[order]  # (n, L, H) float16
        present = (ids >= 0).any(axis=2)
        n, H = hid.shape[0], hid.shape[2]
        finite = np.isfinite(hid).all(axis=2)  # (n, L)
        has_prev = np.zeros(n, bool)  # row i - 1 is the previous token of the same sequence
        has_prev[1:] = next_same[:-1]
        # per-layer standardisation (fitted on the rows that have a hidden state)
        mean = np.zeros((L, H), np.float32)
        std = np.ones((L, H), np.float32)
        for l in range(L):
            h = hid[finite[:, l], l].astype(np.float32)
            if len(h):
                mean[l] = h.mean(axis=0)
                std[l] = np.maximum(h.std(axis=0), 1e-3)

        def inputs(rows: np.ndarray, l: int, valid: np.ndarray | None = None) -> np.ndarray:
            x = np.concatenate([(hid[rows, l].astype(np.float32) - mean[l]) / std[l], hot[rows, l]], axis=1)
            if valid is not None:
                x *= valid[:, None]
            return x

        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        F = H + E
        wx = np.zeros((D, L, F, U), np.float32)
        wy = np.zeros((D, L, F, U), np.float32)
        b1 = np.zeros((D, L, U), np.float32)
        by = np.zeros((D, L, U), np.float32)
        w2 = np.zeros((D, L, U, E), np.float32)
        b2 = np.zeros((D, L, E), np.float32)
        sx = np.zeros((D, L, F, E), np.float32)
        sy = np.zeros((D, L, F, E), np.float32)
        b2y = np.zeros((D, L, E), np.float32)
        # a bar on a terminal only (disable=None: quiet in logs and pipes); one tick per depth's epoch
        bar = tqdm(total=D * self.epochs, unit="epoch", desc="hidden_state fit", leave=False, disable=None)
        for d in range(1, D + 1):
            samples = []
            for l in range(L):
                t, o = (l + d) % L, (l + d) // L
                ok = ahead_in_sequence(next_same, o)
                idx = np.flatnonzero(ok[: n - o] if o else ok)
                idx = idx[finite[idx, l] & present[idx, l] & present[idx + o, t]]
                if len(idx) > self.max_samples:
                    idx = np.sort(rng.choice(idx, self.max_samples, replace=False))
                samples.append((idx, t, o))
            m = min(len(s[0]) for s in samples)
            if m < 2:
                raise ConfigError(f"hidden_state.fit: fewer than 2 training samples at depth {d}; record more text")
            X, Y, V = [], [], []
            for l, (idx, t, o) in enumerate(samples):
                idx = idx[:m]
                # the most recent observation at layer t: this token's (t in the next token) or the previous one's
                src, valid = (idx, np.ones(m, bool)) if o else (np.maximum(idx - 1, 0), has_prev[idx])
                valid = valid & finite[src, t] & present[src, t]
                X.append(np.concatenate([inputs(idx, l), inputs(src, t, valid)], axis=1))
                V.append(valid.astype(np.float32)[:, None])
                Y.append(hot[idx + o, t])
            # one batched network per depth: every layer's perceptron trains side by side (bmm)
            Xt, Yt, Vt = torch.from_numpy(np.stack(X)), torch.from_numpy(np.stack(Y)), torch.from_numpy(np.stack(V))
            W1 = torch.nn.Parameter(torch.randn(L, 2 * F, U) * (2.0 / (2 * F)) ** 0.5)
            B1 = torch.nn.Parameter(torch.zeros(L, 1, U))
            BY = torch.nn.Parameter(torch.zeros(L, 1, U))
            W2 = torch.nn.Parameter(torch.randn(L, U, E) * (1.0 / U) ** 0.5)
            B2 = torch.nn.Parameter(torch.logit(Yt.mean(dim=1, keepdim=True).clamp(1e-3, 1 - 1e-3)))
            params = [W1, B1, BY, W2, B2]
            WS = None
            if self.linear_skip:  # starts at zero: the perceptron alone, until the skip pays
                WS = torch.nn.Parameter(torch.zeros(L, 2 * F, E))
                params.append(WS)
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            steps = max(1, -(-m // self.batch))
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps * self.epochs)
            gen = torch.Generator().manual_seed(self.seed + d)
            for _epoch in range(self.epochs):
                perm = torch.randperm(m, generator=gen)
                for s in range(steps):
                    b = perm[s * self.batch:(s + 1) * self.batch]
                    xb = Xt[:, b]
                    z = torch.relu(torch.bmm(xb, W1) + B1 + Vt[:, b] * BY)
                    logits = torch.bmm(z, W2) + B2
                    if WS is not None:  # the y half of the input is zero where y_t is absent: no skip from it
                        logits = logits + torch.bmm(xb, WS)
                    y = Yt[:, b]
                    listwise = -(torch.log_softmax(logits, dim=2) * y).sum(dim=2).mean() / self.top_k
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 0.25 * listwise
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                bar.update(1)
            W1n = W1.detach().numpy()
            WSn = None if WS is None else WS.detach().numpy()
            w2[d - 1] = W2.detach().numpy()
            b2[d - 1] = B2.detach().numpy()[:, 0]
            # fold the standardisation into the first layer (and the skip): (h - mean) / std @ W
            # = h @ (W / std) - (mean / std) @ W
            for l, (_idx, t, _o) in enumerate(samples):
                for part, src, w, bias, s_w, s_bias in ((0, l, wx, b1, sx, b2), (1, t, wy, by, sy, b2y)):
                    scale = np.concatenate([1.0 / std[src], np.ones(E, np.float32)])
                    shift = np.concatenate([mean[src] / std[src], np.zeros(E, np.float32)])
                    Wp = W1n[l, part * F:(part + 1) * F]
                    w[d - 1, l] = Wp * scale[:, None]
                    bias[d - 1, l] = (B1 if part == 0 else BY).detach().numpy()[l, 0] - shift @ Wp
                    if WSn is not None:
                        Sp = WSn[l, part * F:(part + 1) * F]
                        s_w[d - 1, l] = Sp * scale[:, None]
                        s_bias[d - 1, l] -= shift @ Sp
        bar.close()
        self._set_weights(wx, wy, b1, by, w2, b2, (sx, sy, b2y) if self.linear_skip else None)
        self.fitted = True
        return self

    def _set_weights(self, wx: np.ndarray, wy: np.ndarray, b1: np.ndarray, by: np.ndarray, w2: np.ndarray,
                     b2: np.ndarray, skip: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        """Lay out the fused first-layer matrix: per observed layer ``l``, its own columns for every
        depth, then the columns of the ``(d, (l - d) % L)`` perceptrons that read ``l`` as their target;
        with ``skip = (sx, sy, b2y)``, the same two groups again for the skip's ``E`` columns."""
        D, L, F, U = wx.shape
        E = self.num_experts
        fused = np.empty((L, F, 2 * D * (U + E) if skip is not None else 2 * D * U), np.float32)
        for l in range(L):
            for d in range(D):
                fused[l, :, d * U:(d + 1) * U] = wx[d, l]
                fused[l, :, (D + d) * U:(D + d + 1) * U] = wy[d, (l - d - 1) % L]
                if skip is not None:
                    c = 2 * D * U
                    fused[l, :, c + d * E:c + (d + 1) * E] = skip[0][d, l]
                    fused[l, :, c + (D + d) * E:c + (D + d + 1) * E] = skip[1][d, (l - d - 1) % L]
        self.w_fused = np.ascontiguousarray(fused)
        self.b1, self.by = np.ascontiguousarray(b1, np.float32), np.ascontiguousarray(by, np.float32)
        self.w2, self.b2 = np.ascontiguousarray(w2, np.float32), np.ascontiguousarray(b2, np.float32)
        self.b2y = None if skip is None else np.ascontiguousarray(skip[2], np.float32)
        self._b1y = self.b1 + self.by  # both biases, where the target layer's part is present
        self._b2y = None if skip is None else self.b2 + self.b2y

    # -- online --------------------------------------------------------------------------------
    def _reset_request(self) -> None:
        self._z = [None] * self.num_layers
        self._x = None

    def _start_request(self, rows: int) -> None:
        if self.w_fused is not None:
            self._x = np.zeros((rows, self.w_fused.shape[1]), np.float32)

    def _observe(self, layer: int, experts: np.ndarray, hidden: Any) -> None:
        if hidden is None or self.w_fused is None:
            self._z[layer] = None  # no own part (prior), and no stored part for the perceptrons reading this layer
            return
        h = host_float32(hidden) if hasattr(hidden, "detach") else np.asarray(hidden, np.float32)
        if h.ndim == 1:
            h = h[None, :]
        x = self._x
        H = x.shape[1] - self.num_experts
        if h.shape != (x.shape[0], H):
            raise ConfigError(f"hidden_state: hidden has shape {h.shape}, expected ({x.shape[0]}, {H}) "
                              "(rows, hidden_size of the fitting trace)")
        if not np.isfinite(h.sum()):  # a NaN or inf anywhere makes the sum non-finite (one reduction, not a mask)
            raise ConfigError("hidden_state: the hidden state holds NaN or inf values")
        x[:, :H] = h
        x[:, H:] = 0.0
        w = self.w_fused[layer]
        if x.shape[0] == 1:  # batch-1 decode, the runtime's hot path: the same product on the one row
            e = experts[0]
            x[0, H + e[e >= 0]] = 1.0
            z = (x[0] @ w)[None, :]
        else:
            r, c = np.nonzero(experts >= 0)
            x[r, H + experts[r, c]] = 1.0  # one row at a time: the same vector-matrix product, so the same bits as batch 1
            z = np.empty((x.shape[0], w.shape[1]), np.float32)
            for i in range(x.shape[0]):
                z[i] = x[i] @ w
        self._z[layer] = z

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        self.check_fitted_depth(depth)
        own = self._z[layer] if self._x is not None else None
        if own is None:
            return np.broadcast_to(self.prior[target], (self._rows, self.num_experts))
        U, D, E, d = self.hidden_units, self.max_depth, self.num_experts, depth - 1
        ahead = self._z[target]  # the most recent observation at the target layer (None: not yet, or no hidden)
        if ahead is None:
            z = own[:, d * U:(d + 1) * U] + self.b1[d, layer]
        else:
            z = own[:, d * U:(d + 1) * U] + ahead[:, (D + d) * U:(D + d + 1) * U]
            z += self._b1y[d, layer]
        np.maximum(z, 0.0, out=z)
        w2 = self.w2[d, layer]
        if z.shape[0] == 1:
            y = (z[0] @ w2)[None, :]
        else:
            y = np.empty((z.shape[0], self.num_experts), np.float32)
            for i in range(z.shape[0]):
                y[i] = z[i] @ w2
        if self.b2y is None:
            y += self.b2[d, layer]
        else:  # the skip: its parts were computed in observe with the rest
            c = 2 * D * U
            y += own[:, c + d * E:c + (d + 1) * E]
            if ahead is None:
                y += self.b2[d, layer]
            else:
                y += ahead[:, c + (D + d) * E:c + (D + d + 1) * E]
                y += self._b2y[d, layer]
        e = np.exp(-y.astype(np.float64))
        e += 1.0
        return np.reciprocal(e, out=e)

    def state(self) -> dict[str, np.ndarray]:
        out = {"prior": self.prior}
        if self.w_fused is not None:
            out.update(w_fused=self.w_fused, b1=self.b1, by=self.by, w2=self.w2, b2=self.b2)
            if self.b2y is not None:
                out["b2y"] = self.b2y
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if "w1" in arrays and "w_fused" not in arrays:
            raise ConfigError("this hidden_state predictor was saved by an older moecache (one input per layer); "
                              "fit it again on its trace and save it")
        self.prior = np.asarray(arrays["prior"], np.float64)
        if "w_fused" in arrays:
            self.w_fused = np.ascontiguousarray(arrays["w_fused"], np.float32)
            self.b1, self.by = np.asarray(arrays["b1"], np.float32), np.asarray(arrays["by"], np.float32)
            self.w2, self.b2 = np.asarray(arrays["w2"], np.float32), np.asarray(arrays["b2"], np.float32)
            self._b1y = self.b1 + self.by
            # a save from before the skip has no b2y (and the narrower fused matrix): read as linear_skip=False
            self.b2y = np.asarray(arrays["b2y"], np.float32) if "b2y" in arrays else None
            self._b2y = None if self.b2y is None else self.b2 + self.b2y
            self.linear_skip = self.b2y is not None
            self.params["linear_skip"] = self.linear_skip
