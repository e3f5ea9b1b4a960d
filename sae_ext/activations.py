"""Bi-Jump-ReLU and the two-sided step gate (SPEC §1 v2), with straight-through gradients.

A Bi-Jump-ReLU keeps a pre-activation ``z`` outside a per-latent dead zone
``[-θ⁻, θ⁺]`` and zeroes it inside, so one latent can carry both signs along one decoder
direction::

    BiJumpReLU(z) = z · [H(z − θ⁺) + H(−z − θ⁻)]

The step and the jumps have no useful derivative with respect to the thresholds, so the
backward passes use the JumpReLU straight-through estimator of Rajamanoharan et al. (2024)
(SAELens ``jumprelu``'s ``Step`` / ``JumpReLU``), mirrored for the negative side, with the
rectangle kernel ``K(u) = 1[|u| ≤ ½]`` and bandwidth ``ε``. Passing ``theta_neg=None``
closes the negative side (a one-sided JumpReLU / step). Thresholds are linear and meant to
stay ≥ 0: the SAE projects them back to 0 after the optimiser moves them below.

Comparisons are made in the promoted dtype of ``z`` and the thresholds, so float32
thresholds keep their precision when ``z`` is bfloat16; outputs are in ``z``'s dtype and
threshold gradients in the threshold's dtype (summed over the leading dimensions of ``z``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "BiJumpReLU",
    "BiJumpReLUFunction",
    "SignAwareGatedCodeFunction",
    "TwoSidedStepFunction",
    "bi_jump_relu",
    "sign_aware_gated_code",
    "two_sided_step",
]


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel ``K(u) = 1[|u| ≤ ½]``."""
    return (u.abs() <= 0.5).to(u.dtype)


def _compute_dtype(z: torch.Tensor, theta: torch.Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, theta.dtype)


def _reduce_to(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sum a per-element gradient down to the threshold's shape and dtype."""
    return grad.sum_to_size(theta.shape).to(theta.dtype)


def _check_bandwidth(bandwidth: Any) -> None:
    if isinstance(bandwidth, bool) or not (
        isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth > 0
    ):
        raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")


class BiJumpReLUFunction(torch.autograd.Function):
    """``z · [H(z − θ⁺) + H(−z − θ⁻)]`` with SPEC §1's pseudo-derivatives.

    Backward: ``∂/∂z = H(z − θ⁺) + H(−z − θ⁻)``, ``∂/∂θ⁺ = −(θ⁺/ε) K((z − θ⁺)/ε)``,
    ``∂/∂θ⁻ = +(θ⁻/ε) K((−z − θ⁻)/ε)``.
    """

    @staticmethod
    def forward(
        z: torch.Tensor,
        theta_pos: torch.Tensor,
        theta_neg: torch.Tensor | None,
        bandwidth: float,  # noqa: ARG004
    ) -> torch.Tensor:
        zc = z.to(_compute_dtype(z, theta_pos))
        keep = zc > theta_pos
        if theta_neg is not None:
            keep = keep | (-zc > theta_neg)
        return z * keep.to(z.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        z, theta_pos, theta_neg, bandwidth = inputs
        del output
        ctx.save_for_backward(z, theta_pos, theta_neg)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
        z, theta_pos, theta_neg = ctx.saved_tensors
        eps = ctx.bandwidth
        zc = z.to(_compute_dtype(z, theta_pos))
        g = grad_out.to(zc.dtype)
        pass_pos = zc > theta_pos
        grad_theta_pos = -(theta_pos / eps) * _rectangle((zc - theta_pos) / eps) * g
        grad_theta_neg = None
        if theta_neg is not None:
            pass_pos = pass_pos | (-zc > theta_neg)
            grad_theta_neg = _reduce_to(
                (theta_neg / eps) * _rectangle((-zc - theta_neg) / eps) * g, theta_neg
            )
        grad_z = grad_out * pass_pos.to(grad_out.dtype)
        return grad_z, _reduce_to(grad_theta_pos, theta_pos), grad_theta_neg, None


class TwoSidedStepFunction(torch.autograd.Function):
    """The polarity gates ``(H(z − θ⁺), H(−z − θ⁻))`` with SPEC §1's pseudo-derivatives.

    Backward: ``∂γ±/∂θ± = −(1/ε) K((±z − θ±)/ε)``; ``∂γ/∂z = 0`` (the gate path is trained
    by the auxiliary term, as in a Gated SAE), or with ``ste_to_input``
    ``∂γ⁺/∂z = +(1/ε)K(·)``, ``∂γ⁻/∂z = −(1/ε)K(·)`` (SAELens ``jumprelu_ste_to_input``).
    With ``theta_neg=None`` the negative gate is identically zero.
    """

    @staticmethod
    def forward(
        z: torch.Tensor,
        theta_pos: torch.Tensor,
        theta_neg: torch.Tensor | None,
        bandwidth: float,  # noqa: ARG004
        ste_to_input: bool = False,  # noqa: ARG004
    ) -> tuple[torch.Tensor, torch.Tensor]:
        zc = z.to(_compute_dtype(z, theta_pos))
        gate_pos = (zc > theta_pos).to(z.dtype)
        gate_neg = (-zc > theta_neg).to(z.dtype) if theta_neg is not None else torch.zeros_like(z)
        return gate_pos, gate_neg

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        z, theta_pos, theta_neg, bandwidth, *rest = inputs
        del output
        ctx.save_for_backward(z, theta_pos, theta_neg)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = bool(rest[0]) if rest else False

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_pos: torch.Tensor, grad_neg: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, None, None]:
        z, theta_pos, theta_neg = ctx.saved_tensors
        eps = ctx.bandwidth
        zc = z.to(_compute_dtype(z, theta_pos))
        ste_pos = _rectangle((zc - theta_pos) / eps) / eps * grad_pos.to(zc.dtype)
        grad_theta_pos = _reduce_to(-ste_pos, theta_pos)
        grad_z = ste_pos if ctx.ste_to_input else None
        grad_theta_neg = None
        if theta_neg is not None:
            ste_neg = _rectangle((-zc - theta_neg) / eps) / eps * grad_neg.to(zc.dtype)
            grad_theta_neg = _reduce_to(-ste_neg, theta_neg)
            if grad_z is not None:
                grad_z = grad_z - ste_neg
        if grad_z is not None:
            grad_z = grad_z.to(z.dtype)
        return grad_z, grad_theta_pos, grad_theta_neg, None, None


def bi_jump_relu(
    z: torch.Tensor, theta_pos: torch.Tensor, theta_neg: torch.Tensor | None, bandwidth: float
) -> torch.Tensor:
    """Functional Bi-Jump-ReLU (see :class:`BiJumpReLUFunction`)."""
    return BiJumpReLUFunction.apply(z, theta_pos, theta_neg, bandwidth)  # type: ignore[return-value]


def two_sided_step(
    z: torch.Tensor,
    theta_pos: torch.Tensor,
    theta_neg: torch.Tensor | None,
    bandwidth: float,
    ste_to_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional two-sided step gate (see :class:`TwoSidedStepFunction`)."""
    return TwoSidedStepFunction.apply(z, theta_pos, theta_neg, bandwidth, ste_to_input)  # type: ignore[return-value]


class BiJumpReLU(nn.Module):
    """A Bi-Jump-ReLU activation with learned linear per-unit thresholds ``θ⁺, θ⁻ ≥ 0``.

    The thresholds (``threshold_pos``, ``threshold_neg``) are stored linearly, as SAELens's
    ``jumprelu`` does (a log parameterisation moves a small threshold multiplicatively and
    barely at all under Adam), and kept in float32 (float64 if the module is cast to
    float64) whatever dtype the module or its input is cast to, since Adam's small steps on a
    threshold round away in bfloat16. Call :meth:`clamp_thresholds_` after each optimiser
    step to keep them ≥ 0.

    Args:
        num_units: size of the last dimension of the input.
        initial_threshold: starting value of θ⁺ and θ⁻ (≥ 0).
        bandwidth: straight-through kernel width ε (> 0).
        two_sided: if False there is no negative side (a JumpReLU).
    """

    threshold_pos: nn.Parameter
    threshold_neg: nn.Parameter | None

    def __init__(
        self,
        num_units: int,
        initial_threshold: float = 0.01,
        bandwidth: float = 0.05,
        two_sided: bool = True,
    ) -> None:
        super().__init__()
        if not (math.isfinite(initial_threshold) and initial_threshold >= 0):
            raise ValueError(f"initial_threshold must be a finite number >= 0, got {initial_threshold!r}")
        _check_bandwidth(bandwidth)
        self.bandwidth = bandwidth
        init = torch.full((num_units,), float(initial_threshold))
        self.threshold_pos = nn.Parameter(init.clone())
        self.threshold_neg = nn.Parameter(init.clone()) if two_sided else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return bi_jump_relu(z, self.threshold_pos, self.threshold_neg, self.bandwidth)

    def gates(self, z: torch.Tensor, ste_to_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The polarity gates ``(H(z − θ⁺), H(−z − θ⁻))`` for ``z``."""
        return two_sided_step(z, self.threshold_pos, self.threshold_neg, self.bandwidth, ste_to_input)

    @torch.no_grad()
    def clamp_thresholds_(self) -> None:
        """Project θ⁺, θ⁻ back to ≥ 0 (in place, outside autograd)."""
        for p in (self.threshold_pos, self.threshold_neg):
            if p is not None:
                p.data.clamp_(min=0.0)

    def _apply(self, *args: Any, **kwargs: Any) -> BiJumpReLU:
        with keep_thresholds_at_least_float32(self, ("threshold_pos", "threshold_neg")):
            return super()._apply(*args, **kwargs)

    def extra_repr(self) -> str:
        two_sided = self.threshold_neg is not None
        return f"num_units={self.threshold_pos.numel()}, bandwidth={self.bandwidth}, two_sided={two_sided}"


@contextmanager
def keep_thresholds_at_least_float32(module: nn.Module, names: tuple[str, ...]) -> Iterator[None]:
    """Undo any narrowing of the named parameters by a cast run inside this context.

    ``nn.Module.to(dtype)`` casts every floating parameter; wrap ``_apply`` in this so
    threshold parameters keep their float32 (or float64) values whatever the module's
    dtype. Device moves still apply.
    """
    before = {n: p.data for n in names if (p := module._parameters.get(n)) is not None}
    yield
    for name, old in before.items():
        p = module._parameters.get(name)
        if p is not None and p.is_floating_point() and torch.finfo(p.dtype).bits < 32:
            p.data = old.to(device=p.device, dtype=torch.promote_types(old.dtype, torch.float32))


class SignAwareGatedCodeFunction(torch.autograd.Function):
    """SA-GSAE v2's whole elementwise training encoder in one autograd node (SPEC §1).

    Inputs are 2-D ``[tokens, d_sae]`` (:func:`sign_aware_gated_code` flattens any leading
    dimensions): the shared projection ``μ``, the gate pre-activation ``π`` (= μ + b_gate,
    passed in so it can go through ``hook_sae_acts_pre``), the magnitude bias and radii, and
    the thresholds (≥ 0). Returns

    - ``f = γ⁺ m⁺ − γ⁻ m⁻``: the signed code, computed as σ·ReLU(σ·e^ρ·μ + b_mag) with
      σ = γ⁺ − γ⁻ ∈ {−1, 0, 1} (the gates are disjoint for θ± ≥ 0),
    - ``g = BiJumpReLU(π)`` with ``sg(θ)``: the gate path's own code, for the auxiliary
      reconstruction (no threshold gradient through it),
    - ``ℓ₀ = Σ_i (γ⁺_i + γ⁻_i)`` per token, through the step's straight-through estimator.

    Straight-through terms (K± = K((±π − θ±)/ε)): ``∂γ±/∂θ± = −(1/ε)K±`` reaches θ through
    both f and ℓ₀, and with ``ste_to_input`` ``∂γ±/∂π = ±(1/ε)K±`` reaches π too.

    The values and gradients are those of composing :func:`two_sided_step`, the two
    magnitude ReLUs, :func:`bi_jump_relu` (θ detached) and the sum of the gates with autograd
    (tested against that composition). What it saves is work on the ``(tokens, d_sae)``
    tensors: on CPU each fresh one costs more in page faults than the arithmetic, so the
    passes run in place on few buffers. ``theta_neg=None`` closes the negative side;
    ``rho_neg`` may be the very tensor ``rho_pos`` (tied radii), whose whole gradient is then
    returned in the first slot.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mu: torch.Tensor,
        pi: torch.Tensor,
        b_mag: torch.Tensor,
        rho_pos: torch.Tensor,
        rho_neg: torch.Tensor,
        theta_pos: torch.Tensor,
        theta_neg: torch.Tensor | None,
        bandwidth: float,
        ste_to_input: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pic = pi.to(_compute_dtype(pi, theta_pos))
        sigma = torch.empty_like(mu)
        torch.gt(pic, theta_pos, out=sigma)  # 1.0 where γ⁺ is open
        if theta_neg is not None:
            sigma.masked_fill_(pic < -theta_neg, -1.0)  # γ⁻ (disjoint from γ⁺: θ± ≥ 0)
        tied = rho_neg is rho_pos or theta_neg is None
        scale = _side_scale(sigma, rho_pos, None if tied else rho_neg)
        f = torch.mul(mu, scale).mul_(sigma).add_(b_mag).relu_().mul_(sigma)
        g = torch.mul(pi, sigma).mul_(sigma)  # π where a gate is open
        l0 = sigma.abs().sum(-1, dtype=pic.dtype)  # exact counts even for a bf16 code
        ctx.bandwidth, ctx.tied, ctx.ste_to_input = bandwidth, tied, ste_to_input
        ctx.save_for_backward(mu, pi, f, sigma, b_mag, rho_pos, rho_neg, theta_pos, theta_neg)
        ctx.set_materialize_grads(False)
        return f, g, l0

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_f: torch.Tensor | None, grad_g: torch.Tensor | None, grad_l0: torch.Tensor | None
    ) -> tuple[Any, ...]:
        mu, pi, f, sigma, b_mag, rho_pos, rho_neg, theta_pos, theta_neg = ctx.saved_tensors
        eps, tied, ste_to_input = ctx.bandwidth, ctx.tied, ctx.ste_to_input
        grad_mu = grad_pi = grad_b = grad_rho_pos = grad_rho_neg = None

        # through f: the magnitude path reaches μ, b_mag and ρ
        if grad_f is not None:
            scale = _side_scale(sigma, rho_pos, None if tied else rho_neg)
            sign_f = torch.sign(f)  # σ·1[m > 0]
            q = grad_f * sign_f
            grad_b = q.sum(0)  # ∂f/∂b_mag = σ·1[m > 0]
            q.mul_(sign_f)  # grad_f where f ≠ 0
            grad_mu = torch.mul(q, scale, out=sign_f)
            q.mul_(mu).mul_(scale)  # ∂f/∂ρ = 1[f ≠ 0]·e^ρ·μ
            grad_rho_pos = q.sum(0)
            if not tied:
                grad_rho_neg = torch.where(sigma < 0, q, 0).sum(0)
                grad_rho_pos = grad_rho_pos - grad_rho_neg

        # through g: BiJumpReLU passes the gradient where a gate is open (σ² = 1)
        if grad_g is not None:
            grad_pi = grad_g * sigma
            grad_pi.mul_(sigma)

        # the gates' straight-through terms, per side s = ±1:
        #   T_s = K_s · (s·m_s·G_f + G_ℓ₀),  ∂L/∂θ_s = −(1/ε) Σ_tokens T_s,  ∂L/∂π += (s/ε)·T_s
        grads_theta: list[torch.Tensor | None] = [None, None]
        if grad_f is not None or grad_l0 is not None:
            pic = pi.to(_compute_dtype(pi, theta_pos))
            window = torch.empty_like(pic)
            work = torch.empty_like(pic)
            sides = [(theta_pos, 1.0, rho_pos), (theta_neg, -1.0, rho_neg)]
            for i, (theta, side, rho) in enumerate(sides):
                if theta is None:
                    continue
                # |−π − θ⁻| = |π + θ⁻| exactly
                torch.sub(pic, theta, out=window) if side > 0 else torch.add(pic, theta, out=window)
                window.div_(eps).abs_().le_(0.5)
                if grad_f is not None:  # s·m_s·G_f, m_s = ReLU(s·e^ρ·μ + b_mag)
                    torch.mul(mu, rho.exp() * side, out=work).add_(b_mag).relu_().mul_(grad_f)
                    if side < 0:
                        work.neg_()
                    if grad_l0 is not None:
                        work.add_(grad_l0[:, None])
                else:
                    work.copy_(grad_l0[:, None].expand_as(work))  # type: ignore[index]
                work.mul_(window)
                grads_theta[i] = (work.sum(0) * (-1.0 / eps)).to(theta.dtype)
                if ste_to_input:
                    step = (work * (side / eps)).to(pi.dtype)
                    grad_pi = step if grad_pi is None else grad_pi.add_(step)
        return (grad_mu, grad_pi, grad_b, grad_rho_pos, grad_rho_neg, grads_theta[0], grads_theta[1],
                None, None)


def _side_scale(sigma: torch.Tensor, rho_pos: torch.Tensor, rho_neg: torch.Tensor | None) -> torch.Tensor:
    """e^ρ per entry: ρ⁺ where σ ≥ 0, ρ⁻ where σ < 0 (a broadcast row when ``rho_neg`` is None)."""
    if rho_neg is None:
        return rho_pos.exp()
    return torch.where(sigma < 0, rho_neg.exp(), rho_pos.exp())


def sign_aware_gated_code(
    mu: torch.Tensor,
    pi: torch.Tensor,
    b_mag: torch.Tensor,
    rho_pos: torch.Tensor,
    rho_neg: torch.Tensor,
    theta_pos: torch.Tensor,
    theta_neg: torch.Tensor | None,
    bandwidth: float,
    ste_to_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional form of :class:`SignAwareGatedCodeFunction`: ``(f, g, ℓ₀ per token)``.

    ``mu`` and ``pi`` are ``[..., d_sae]`` with any leading dimensions (flattened for the
    node and restored on the outputs; ℓ₀ has the leading shape). Checks shapes and the
    bandwidth first (NaN/Inf in the activations are the SAE's input check's job, before μ
    exists); the autograd node itself trusts its inputs.
    """
    if mu.shape != pi.shape or mu.dim() < 1:
        raise ValueError(f"mu and pi must have the same [..., d_sae] shape, got {tuple(mu.shape)} and {tuple(pi.shape)}")
    d_sae = mu.shape[-1]
    vectors = {"b_mag": b_mag, "rho_pos": rho_pos, "rho_neg": rho_neg, "theta_pos": theta_pos,
               "theta_neg": theta_neg}
    bad = {n: tuple(v.shape) for n, v in vectors.items() if v is not None and tuple(v.shape) != (d_sae,)}
    if bad:
        raise ValueError(f"per-latent parameters must have shape ({d_sae},) to match d_sae; got {bad}")
    _check_bandwidth(bandwidth)
    lead = mu.shape[:-1]
    f, g, l0 = SignAwareGatedCodeFunction.apply(
        mu.reshape(-1, d_sae), pi.reshape(-1, d_sae), b_mag, rho_pos, rho_neg, theta_pos, theta_neg,
        bandwidth, bool(ste_to_input),
    )
    return f.reshape(*lead, d_sae), g.reshape(*lead, d_sae), l0.reshape(lead)
