"""Logistic-regression probes in torch: the one probe definition the probing metrics share.

:func:`fit_logistic` fits ``P`` independent binary (one-vs-rest) logistic regressions at once on
features ``x [n, d]`` and 0/1 targets ``y [n, P]``. Without an L1 term it minimises, per probe,
sklearn's ``LogisticRegression(C=C)`` objective divided by ``C·n`` (mean weighted log-loss plus
``‖w‖² / (2Cn)``, bias unpenalised) with full-batch L-BFGS — the probe SAEBench fits with
sklearn. With ``l1 > 0`` it adds ``l1·‖w‖₁`` and uses Adam with an exponentially decaying step
(SAEBench's L1 "k-sparse" selection probe): the weights only rank features, so exact zeros
are not needed. ``class_weight="balanced"`` weighs each class by ``n / (2·n_class)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["LogisticProbe", "binary_f1", "fit_logistic", "sae_codes"]


@dataclass(frozen=True)
class LogisticProbe:
    """``P`` binary probes: ``logit = x @ weight.T + bias`` (``weight [P, d]``, ``bias [P]``)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, P]`` of features ``x [n, d]``."""
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"x must be [n, {self.weight.shape[1]}] for this probe; got shape {tuple(x.shape)}"
            )
        w = self.weight.to(x.device, x.dtype)
        return x @ w.T + self.bias.to(x.device, x.dtype)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """0/1 predictions ``[n, P]`` (logit > 0)."""
        return (self.logits(x) > 0).long()


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a [n >= 2, d >= 1] tensor of features; got {shape}")
    if not torch.is_floating_point(x) or not bool(torch.isfinite(x).all()):
        raise ValueError("x must be a finite floating-point tensor")
    y2 = y.unsqueeze(1) if y.ndim == 1 else y
    if y2.ndim != 2 or y2.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must be [n] or [n, P] with n = {x.shape[0]}; got shape {tuple(y.shape)}"
        )
    if not bool(((y2 == 0) | (y2 == 1)).all()):
        raise ValueError("y must hold only 0/1 targets")
    pos = y2.sum(0)
    if bool(((pos == 0) | (pos == y2.shape[0])).any()):
        raise ValueError("every probe needs both positive and negative examples in y")
    return y2.to(x.dtype)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    C: float = 1.0,
    l1: float = 0.0,
    class_weight: Literal["balanced"] | None = "balanced",
    max_iter: int = 200,
    lr: float = 0.01,
) -> LogisticProbe:
    """Fit ``P`` binary logistic probes on ``x [n, d]`` with 0/1 targets ``y [n] or [n, P]``.

    ``C`` is sklearn's inverse L2 strength; ``l1 > 0`` switches to the L1-penalised Adam fit
    (``max_iter`` steps, ``lr`` decaying to ``lr/1000``). Runs on ``x``'s device and dtype.
    """
    y2 = _check_xy(x, y)
    if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise ValueError(f"C must be a finite number > 0, got {C!r}")
    if not (isinstance(l1, (int, float)) and math.isfinite(l1) and l1 >= 0):
        raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")
    if class_weight not in ("balanced", None):
        raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")

    n, d = x.shape
    n_probes = y2.shape[1]
    if class_weight == "balanced":
        pos = y2.sum(0, keepdim=True)
        sample_w = torch.where(y2 > 0, n / (2 * pos), n / (2 * (n - pos)))
    else:
        sample_w = torch.ones_like(y2)
    w = torch.zeros(n_probes, d, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_probes, dtype=x.dtype, device=x.device, requires_grad=True)
    x = x.detach()

    def data_loss() -> torch.Tensor:
        logits = x @ w.T + b
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y2, reduction="none")
        return (nll * sample_w).mean(0).sum()

    with torch.enable_grad():
        if l1 == 0:
            opt = torch.optim.LBFGS(
                [w, b], lr=1.0, max_iter=max_iter, history_size=20,
                tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe",
            )  # fmt: skip

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = data_loss() + w.pow(2).sum() / (2 * C * n)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt_a = torch.optim.Adam([w, b], lr=lr)
            gamma = math.exp(math.log(1e-3) / max_iter)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt_a, gamma=gamma)
            for _ in range(max_iter):
                opt_a.zero_grad()
                loss = data_loss() + w.pow(2).sum() / (2 * C * n) + l1 * w.abs().sum()
                loss.backward()
                opt_a.step()
                sched.step()
    return LogisticProbe(w.detach(), b.detach())


def binary_f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """F1 of 0/1 predictions against 0/1 targets (0.0 when there are no true positives)."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )
    p, t = pred.bool(), target.bool()
    tp = int((p & t).sum())
    denom = int(p.sum()) + int(t.sum())
    return 2 * tp / denom if denom else 0.0


@torch.no_grad()
def sae_codes(sae: Any, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``sae.encode`` of ``x [..., d_in]`` in batches of rows, as float32 on the CPU.

    Every ``encode`` is paired with a ``decode`` so that a scaffolded SAE is left with no
    pending scaffold (its ``decode`` consumes the one the last ``encode`` computed).
    """
    p = next(sae.parameters())
    flat = x.reshape(-1, x.shape[-1])
    out = []
    for b in torch.split(flat, batch_size):
        f = sae.encode(b.to(p.device, p.dtype))
        sae.decode(f)
        out.append(f.float().cpu())
    return torch.cat(out).reshape(*x.shape[:-1], -1)
