"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for FL") — docs/algorithms.md §2.3.

Control variates over the trainable tensors (Karimireddy et al. 2020, Algorithm 1):

* server variate ``c`` and one client variate ``c_k`` per client, all starting at 0;
* local step on the corrected gradient (Alg. 1 line 10): ``g − c_k + c``;
* after ``K`` local steps with learning rate ``η`` (Alg. 1 line 12, "option II"):
  ``c_k⁺ = c_k − c + (w_global − w_k) / (K·η)``, and the client sends ``Δw_k = w_k − w_global``
  and ``Δc_k = c_k⁺ − c_k`` (line 13);
* server (lines 16–17): ``w ← w + η_g · Σ_k a_k Δw_k`` with the FedAvg example weights
  ``a_k = n_k / Σ_j n_j`` (the paper's uniform ``1/|S|``, weighted as everywhere in this
  project; ``η_g = 1`` makes this FedAvg of the ``w_k``), and
  ``c ← c + (|S|/N) · (1/|S|) Σ_{k∈S} Δc_k = c + (1/N) Σ_{k∈S} Δc_k``, with ``N`` the number of
  clients — uniform, as in the paper, which keeps ``c = (1/N) Σ_k c_k`` at every round.

Choices (documented parameters):

* per-key ``N``: a tensor that only some clients hold (a task head) uses the number of
  clients holding it, so ``c`` stays the mean of the ``c_k`` of its holders (``holders`` may be
  an int for "every client holds every key");
* ``η`` is the client's peak learning rate (``LocalResult.lr``) and ``K`` its number of local
  steps. The project's local optimiser is AdamW with warm-up/decay and gradient clipping
  (applied after the correction), not plain SGD: option II's ``(w_global − w_k)/(K·η)`` is then
  an estimate of the mean corrected update direction rather than of the mean gradient;
* variates have the dtype of the tensors they control, so ``Δc_k`` serialises to exactly the
  size of the trainable upload: with the variates, SCAFFOLD sends twice FedAvg's bytes in
  each direction (``w`` and ``c`` down, ``w_k`` and ``Δc_k`` up).

Pure torch; no engine, transformers or Flower imports. Verbs never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedmoe.algorithms import AlgorithmSpec
from fedmoe.core.aggregation import normalised_weights

#: this algorithm's registry entry (read by :func:`fedmoe.algorithms.discover`)
SPEC = AlgorithmSpec("scaffold", "SCAFFOLD: control variates correct the local gradients",
                     "fedmoe.engine.strategies.baselines:ScaffoldStrategy", "fedmoe.algorithms.scaffold", "§2.3", ("scaffold",))

ClientId = int


@dataclass
class ScaffoldUpload:
    """One client's reply: trained tensors ``w_k``, variate change ``Δc_k``, example count."""

    client_id: ClientId
    num_examples: int
    weights: dict[str, Tensor]
    delta_c: dict[str, Tensor]


@dataclass
class ScaffoldServerState:
    """Server-side SCAFFOLD state besides the global weights: ``c`` and the client counts ``N``."""

    c: dict[str, Tensor]
    holders: dict[str, int]  #: N per key: how many clients hold (train) that tensor
    round: int = 0


@dataclass
class ScaffoldClientState:
    """Client-held SCAFFOLD state: the client's variate ``c_k`` (never leaves the client)."""

    c_k: dict[str, Tensor] = field(default_factory=dict)


def init_server_state(template: Mapping[str, Tensor], holders: int | Mapping[str, int]) -> ScaffoldServerState:
    """``c = 0`` shaped like ``template``; ``holders`` = N (int) or N per key."""
    n = {k: int(holders) for k in template} if isinstance(holders, int) else {k: int(holders[k]) for k in template}
    bad = {k: v for k, v in n.items() if v < 1}
    if bad:
        raise ValueError(f"SCAFFOLD needs N >= 1 clients per tensor; got {dict(list(bad.items())[:3])}.")
    return ScaffoldServerState({k: torch.zeros_like(v) for k, v in template.items()}, n)


def corrected_gradient(g: Tensor, c_k: Tensor, c: Tensor) -> Tensor:
    """The SCAFFOLD local direction ``g − c_k + c`` (Alg. 1 line 10)."""
    return g - c_k + c


def client_variate_update(
    c_k: Mapping[str, Tensor], c: Mapping[str, Tensor], w_global: Mapping[str, Tensor], w_local: Mapping[str, Tensor],
    steps: int, lr: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Option II of Alg. 1 line 12: ``c_k⁺ = c_k − c + (w_global − w_k)/(K·η)``; returns ``(c_k⁺, Δc_k)``.

    Over the keys of ``c`` (a key missing from ``c_k`` has ``c_k = 0``). ``steps`` = 0 (the
    client did not train) leaves ``c_k`` unchanged and ``Δc_k = 0``. Computed in float64 and
    cast to the dtype of ``c``.
    """
    if steps < 0 or (steps > 0 and lr <= 0):
        raise ValueError(f"SCAFFOLD variate update needs K >= 0 steps and η > 0; got K={steps}, η={lr}.")
    new: dict[str, Tensor] = {}
    delta: dict[str, Tensor] = {}
    for key, cv in c.items():
        ck = c_k.get(key)
        ck = torch.zeros_like(cv) if ck is None else ck.detach().to(cv.device)
        if steps == 0:
            new[key], delta[key] = ck.clone(), torch.zeros_like(cv)
            continue
        f64 = torch.float64
        drift = (w_global[key].detach().to(cv.device, f64) - w_local[key].detach().to(cv.device, f64)) / (steps * lr)
        nk = ck.to(f64) - cv.detach().to(f64) + drift
        new[key] = nk.to(cv.dtype)
        delta[key] = (nk - ck.to(f64)).to(cv.dtype)
    return new, delta


def server_update(
    weights: Mapping[str, Tensor], state: ScaffoldServerState, uploads: Sequence[ScaffoldUpload], *,
    server_lr: float = 1.0,
) -> tuple[dict[str, Tensor], ScaffoldServerState]:
    """Alg. 1 lines 16–17: ``w ← w + η_g Σ_k a_k (w_k − w)``, ``c ← c + (1/N) Σ_{k∈S} Δc_k``.

    Per key, over the clients that sent it (``a_k`` = example weights among them); keys sent
    by nobody are unchanged. Arithmetic in float64, cast back to each tensor's dtype.
    Returns new ``(weights, state)``.
    """
    for up in uploads:
        for key, t in (*up.weights.items(), *up.delta_c.items()):
            if key not in weights:
                raise ValueError(f"Client {up.client_id} sent `{key}`, absent from the global weights.")
            if tuple(t.shape) != tuple(weights[key].shape):
                raise ValueError(f"Client {up.client_id} sent `{key}` with shape {tuple(t.shape)}; "
                                 f"the global tensor has shape {tuple(weights[key].shape)}.")
        missing = set(up.delta_c) - set(state.c)
        if missing:
            raise ValueError(f"Client {up.client_id} sent Δc for keys without a server variate: {sorted(missing)[:3]}.")
    f64 = torch.float64
    new_w = dict(weights)
    for key, w in weights.items():
        senders = [u for u in uploads if key in u.weights]
        if not senders:
            continue
        a = normalised_weights([u.num_examples for u in senders], f"`{key}` example counts")
        w64 = w.detach().to(f64)
        step = torch.zeros_like(w64)
        for ak, u in zip(a, senders, strict=True):
            step.add_(u.weights[key].detach().to(w.device, f64) - w64, alpha=ak)
        new_w[key] = (w64 + server_lr * step).to(w.dtype)
    new_c = dict(state.c)
    for key, c in state.c.items():
        deltas = [u.delta_c[key] for u in uploads if key in u.delta_c]
        if not deltas:
            continue
        total = torch.zeros(c.shape, dtype=f64, device=c.device)
        for d in deltas:
            total.add_(d.detach().to(c.device, f64))
        new_c[key] = (c.detach().to(f64) + total / state.holders[key]).to(c.dtype)
    return new_w, ScaffoldServerState(new_c, dict(state.holders), state.round + 1)


class ScaffoldClient:
    """One client's SCAFFOLD turn, as local-loop hooks (client side).

    ``before_step(named_params)`` (``LocalHooks.before_step``) adds ``c − c_k`` to each
    controlled tensor's gradient, turning ``g`` into ``g − c_k + c``; its first call (first
    local step, before any update) also snapshots ``w_global``. :meth:`finish` then returns
    ``(c_k⁺, Δc_k)`` from the trained tensors. Keys of ``c`` that are not parameters of the
    loop (e.g. buffers of a full-fine-tuning state) are not trained: their ``c_k`` stays and
    their ``Δc_k`` is 0.
    """

    def __init__(self, c: Mapping[str, Tensor], c_k: Mapping[str, Tensor]) -> None:
        self.c = dict(c)
        self.c_k = {k: (c_k[k] if k in c_k else torch.zeros_like(v)) for k, v in self.c.items()}
        self.w_global: dict[str, Tensor] | None = None
        self.params: Mapping[str, Tensor] | None = None
        self._corr: dict[str, Tensor] = {}

    def before_step(self, named_params: Mapping[str, Tensor]) -> None:
        if self.w_global is None:
            self.params = named_params
            keys = [k for k in self.c if k in named_params]
            self.w_global = {k: named_params[k].detach().clone() for k in keys}
            for k in keys:
                p = named_params[k]
                self._corr[k] = (self.c[k].to(torch.float64) - self.c_k[k].to(torch.float64)).to(p.device, p.dtype)
        for k, corr in self._corr.items():
            p = named_params[k]
            if p.grad is None:
                p.grad = corr.clone()
            else:
                p.grad.add_(corr)

    def finish(self, steps: int, lr: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(c_k⁺, Δc_k)`` on CPU, in the controlled tensors' dtypes (``steps`` = 0: unchanged, 0)."""
        new, delta = client_variate_update(self.c_k, self.c, {}, {}, 0, lr)  # the untrained default
        if self.w_global is None or self.params is None or steps == 0:
            return new, delta
        w_local = {k: self.params[k].detach() for k in self.w_global}
        c = {k: self.c[k].to(self.params[k].dtype) for k in self.w_global}
        trained_new, trained_delta = client_variate_update(self.c_k, c, self.w_global, w_local, steps, lr)
        new.update({k: v.cpu() for k, v in trained_new.items()})
        delta.update({k: v.cpu() for k, v in trained_delta.items()})
        return new, delta
