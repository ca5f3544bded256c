"""``hidden_state``: a small learned network reads the residual stream at layer ``l`` and predicts the
experts of layer ``l + d`` (in the manner of ProMoE's learned predictors).

Input, per row, right after MoE layer ``l`` routed a token: that layer's input hidden state ``h``
(what its router reads: the residual stream after the layer's pre-MoE norm, ``hidden_size`` wide)
and the multi-hot of the experts it chose (``E`` wide). For every ``(d, l)``, ``d <= max_depth``,
one two-layer perceptron maps it to a score per expert of the target layer ``t = (l + d) % L`` (of
the next token when ``l + d >= L``: the last layers' residual stream already encodes the next
token, so these targets are learned too, not left to a fallback)::

    z = relu(W1 [ (h - mean_l) / std_l ; multi_hot ] + b1)      (hidden_units wide)
    scores = sigmoid(W2 z + b2);  prediction = normalise(scores)

trained with binary cross-entropy on the 0/1 "selected" targets (Adam, ``epochs`` passes over at
most ``max_samples`` samples per ``(d, l)``, seeded, so a fit is repeatable on one machine). The
standardisation is folded into ``W1`` after training, so a prediction is two float32 matrix-vector
products per row in numpy: no torch op on the hot path. Rows are multiplied one at a time, so a row's
answer does not depend on how many rows share the call (a matrix product's summation order would).

Fitting needs a trace with hidden states (format version 2: ``moecache.record(model, path,
hidden_states=True)``) and torch (the runtime's own dependency). A row observed without a hidden
state (or a trace without them at prediction time) gets the target layer's prior. Where it runs:
on the host, in the runtime's per-layer predictor call; the runtime hands it the MoE block's input,
so on a GPU that is one device-to-host copy of ``hidden_size`` values per row and layer (a host
sync, as for ``gate_lookahead``). Trace-only predictors remain the defaults where no hidden states
exist; the simulator refuses predictors that read hidden states (a routing trace has none).

Tie-break: equal scores give equal probabilities; consumers take the lowest expert id first.
Cost: ``O(rows * (hidden + E) * hidden_units + rows * hidden_units * E)`` per prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import PREDICTORS
from ._common import StreamPredictor, ahead_in_sequence, check_trace, layer_prior, multi_hot, token_order


@PREDICTORS.register("hidden_state", "a small network on the residual stream at layer l predicts layer l+d "
                                     "(fitted on a trace recorded with hidden states)")
class HiddenStatePredictor(StreamPredictor):
    """Params: ``max_depth`` (2), ``hidden_units`` (512), ``epochs`` (12), ``lr`` (2e-3), ``weight_decay``
    (1e-4), ``batch`` (512), ``max_samples`` (200000), ``seed`` (0)."""

    name = "hidden_state"
    needs_fit = True
    needs_model = True  # reads hidden states: runtime (and predict_eval with hidden=...), never a routing trace

    def __init__(self, num_layers: int, num_experts: int, top_k: int, max_depth: int = 2, hidden_units: int = 512,
                 epochs: int = 12, lr: float = 2e-3, weight_decay: float = 1e-4, batch: int = 512,
                 max_samples: int = 200000, seed: int = 0):
        super().__init__(num_layers, num_experts, top_k, max_depth=int(max_depth), hidden_units=int(hidden_units),
                         epochs=int(epochs), lr=float(lr), weight_decay=float(weight_decay), batch=int(batch),
                         max_samples=int(max_samples), seed=int(seed))
        if max_depth < 1 or hidden_units < 1 or epochs < 1 or lr <= 0 or weight_decay < 0 or batch < 1 \
                or max_samples < 2:
            raise ConfigError(f"hidden_state: need max_depth, hidden_units, epochs, batch >= 1, lr > 0, weight_decay "
                              f">= 0, max_samples >= 2; got {max_depth}, {hidden_units}, {epochs}, {batch}, {lr}, "
                              f"{weight_decay}, {max_samples}")
        self.max_depth, self.hidden_units, self.epochs = int(max_depth), int(hidden_units), int(epochs)
        self.lr, self.weight_decay, self.batch = float(lr), float(weight_decay), int(batch)
        self.max_samples, self.seed = int(max_samples), int(seed)
        self.prior = np.full((num_layers, num_experts), top_k / num_experts)
        self.w1: np.ndarray | None = None  # (D, L, F, U) float32, standardisation folded in
        self.b1: np.ndarray | None = None  # (D, L, U)
        self.w2: np.ndarray | None = None  # (D, L, U, E)
        self.b2: np.ndarray | None = None  # (D, L, E)
        self._x: dict[int, np.ndarray | None] = {}

    @property
    def hidden_size(self) -> int | None:
        return None if self.w1 is None else self.w1.shape[2] - self.num_experts

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, trace: Any) -> "HiddenStatePredictor":
        import torch

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
        # per-layer standardisation (fitted on the rows that have a hidden state)
        mean = np.zeros((L, H), np.float32)
        std = np.ones((L, H), np.float32)
        for l in range(L):
            h = hid[finite[:, l], l].astype(np.float32)
            if len(h):
                mean[l] = h.mean(axis=0)
                std[l] = np.maximum(h.std(axis=0), 1e-3)
        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        F = H + E
        w1 = np.zeros((D, L, F, U), np.float32)
        b1 = np.zeros((D, L, U), np.float32)
        w2 = np.zeros((D, L, U, E), np.float32)
        b2 = np.zeros((D, L, E), np.float32)
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
            # one batched network per depth: every layer's perceptron trains side by side (bmm)
            X = np.stack([np.concatenate([(hid[idx, l].astype(np.float32) - mean[l]) / std[l], hot[idx, l]], axis=1)[:m]
                          for l, (idx, t, o) in enumerate(samples)])  # (L, m, F)
            Y = np.stack([hot[idx + o, t][:m] for (idx, t, o) in samples])  # (L, m, E)
            Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
            W1 = torch.nn.Parameter(torch.randn(L, F, U) * (2.0 / F) ** 0.5)
            B1 = torch.nn.Parameter(torch.zeros(L, 1, U))
            W2 = torch.nn.Parameter(torch.randn(L, U, E) * (1.0 / U) ** 0.5)
            B2 = torch.nn.Parameter(torch.logit(torch.from_numpy(Y.mean(axis=1, keepdims=True)).clamp(1e-3, 1 - 1e-3)))
            opt = torch.optim.AdamW([W1, B1, W2, B2], lr=self.lr, weight_decay=self.weight_decay)
            steps = max(1, -(-m // self.batch))
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps * self.epochs)
            gen = torch.Generator().manual_seed(self.seed + d)
            for _epoch in range(self.epochs):
                perm = torch.randperm(m, generator=gen)
                for s in range(steps):
                    b = perm[s * self.batch:(s + 1) * self.batch]
                    z = torch.relu(torch.bmm(Xt[:, b], W1) + B1)
                    logits = torch.bmm(z, W2) + B2
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, Yt[:, b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
            W1n = W1.detach().numpy()
            # fold the standardisation into the first layer: (h - mean) / std @ W = h @ (W / std) - (mean / std) @ W
            scale = np.concatenate([1.0 / std, np.ones((L, E), np.float32)], axis=1)  # (L, F)
            shift = np.concatenate([mean / std, np.zeros((L, E), np.float32)], axis=1)
            w1[d - 1] = W1n * scale[:, :, None]
            b1[d - 1] = B1.detach().numpy()[:, 0] - np.einsum("lf,lfu->lu", shift, W1n)
            w2[d - 1] = W2.detach().numpy()
            b2[d - 1] = B2.detach().numpy()[:, 0]
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        self.fitted = True
        return self

    # -- online --------------------------------------------------------------------------------
    def _reset_request(self) -> None:
        self._x = {}

    def _observe(self, layer: int, experts: np.ndarray, hidden: Any) -> None:
        if hidden is None:
            self._x[layer] = None
            return
        if hasattr(hidden, "detach"):  # a torch tensor (the runtime): one copy to the host
            hidden = hidden.detach().float().cpu().numpy()
        h = np.asarray(hidden, np.float32)
        if h.ndim == 1:
            h = h[None, :]
        H = self.hidden_size
        if H is not None and h.shape != (self._rows, H):
            raise ConfigError(f"hidden_state: hidden has shape {h.shape}, expected ({self._rows}, {H}) "
                              "(rows, hidden_size of the fitting trace)")
        x = np.empty((h.shape[0], h.shape[1] + self.num_experts), np.float32)
        x[:, :h.shape[1]] = h
        x[:, h.shape[1]:] = multi_hot(experts, self.num_experts)
        self._x[layer] = x

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        if depth > self.max_depth:
            raise ConfigError(f"hidden_state was fitted up to depth {self.max_depth}, asked for {depth}: build it "
                              f"with max_depth={depth} and fit again")
        x = self._x.get(layer)
        if x is None or self.w1 is None:
            return np.broadcast_to(self.prior[target], (self._rows, self.num_experts))
        if not np.isfinite(x).all():
            raise ConfigError("hidden_state: the hidden state holds NaN or inf values")
        w1, b1 = self.w1[depth - 1, layer], self.b1[depth - 1, layer]
        w2, b2 = self.w2[depth - 1, layer], self.b2[depth - 1, layer]
        logits = np.empty((x.shape[0], self.num_experts), np.float64)
        for r in range(x.shape[0]):  # one row at a time: the same bits whatever the batch
            z = x[r] @ w1
            z += b1
            np.maximum(z, 0.0, out=z)
            y = z @ w2
            y += b2
            logits[r] = y
        return 1.0 / (1.0 + np.exp(-logits))

    def state(self) -> dict[str, np.ndarray]:
        out = {"prior": self.prior}
        if self.w1 is not None:
            out.update(w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.prior = np.asarray(arrays["prior"], np.float64)
        if "w1" in arrays:
            self.w1, self.b1 = np.asarray(arrays["w1"], np.float32), np.asarray(arrays["b1"], np.float32)
            self.w2, self.b2 = np.asarray(arrays["w2"], np.float32), np.asarray(arrays["b2"], np.float32)
