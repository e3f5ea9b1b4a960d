"""Sign-aware gated SAE (SA-GSAE, SPEC §1), registered as ``sign_aware_gated``.

A Gated SAE made two-sided: one latent can fire positive or negative along a single
decoder direction, so anticorrelated concepts ("too high" / "too low") share one latent::

    μ  = x̃ W_enc                               shared projection
    π  = μ + b_gate                            signed gate pre-activation (hook_sae_acts_pre)
    γ⁺ = H(π − θ⁺),  γ⁻ = H(−π − θ⁻)           polarity gates (disjoint, dead zone [−θ⁻, θ⁺])
    m⁺ = ReLU( e^{ρ⁺} μ + b_mag),  m⁻ = ReLU(−e^{ρ⁻} μ + b_mag)
    f  = γ⁺ m⁺ − γ⁻ m⁻                          signed latent (hook_sae_acts_post)
    x̂  = f W_dec + b_dec

    L  = ‖x − x̂‖² + λ Σ_i |BiJumpReLU(π)_i| ‖W_dec,i‖
         + α ‖x − (BiJumpReLU(π) sg(W_dec) + sg(b_dec))‖²

Parameters: ``b_gate``, ``b_mag``, ``r_mag`` (ρ⁺, or the shared ρ when ``tie_radii``),
``r_mag_neg`` (ρ⁻, only when ``two_sided`` and not ``tie_radii``), and the thresholds:
``log_threshold_pos`` / ``log_threshold_neg`` while training, ``threshold_pos`` /
``threshold_neg`` (linear space) in the saved inference SAE. The negative-side parameters
do not exist when ``two_sided=False``. Thresholds are float32 (float64 for a float64 SAE)
whatever the SAE dtype, ``.to(dtype)`` included, and gates are compared in that precision.
(SAELens's disk loader casts every saved tensor to the config dtype before loading, so a
bf16 SAE loaded from disk gets float32 thresholds holding bf16-rounded values.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from numpy.typing import NDArray
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from torch import nn
from typing_extensions import override

from sae_ext.activations import (
    bi_jump_relu,
    keep_thresholds_at_least_float32,
    sign_aware_gated_code,
    two_sided_step,
)
from sae_ext.registry import register_inference, register_training
from sae_ext.validation import check_sae_input, check_training_input

ARCHITECTURE = "sign_aware_gated"

_LOG_THRESHOLDS = ("log_threshold_pos", "log_threshold_neg")
_THRESHOLDS = ("threshold_pos", "threshold_neg")

Gates = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class SignAwareGatedSAEConfig(SAEConfig):
    """Configuration of an inference :class:`SignAwareGatedSAE`.

    Args:
        tie_radii: one radius ρ = ρ⁺ = ρ⁻ per latent (the paper's recommended default).
        two_sided: open the negative gate; False gives a one-sided JumpReLU-gated SAE.
    """

    tie_radii: bool = True
    two_sided: bool = True

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


@dataclass
class SignAwareGatedTrainingSAEConfig(TrainingSAEConfig):
    """Configuration for training a :class:`SignAwareGatedTrainingSAE`.

    Args:
        l1_coefficient: λ, weight of the sparsity penalty Σ|BiJumpReLU(π)|·‖W_dec,i‖ (≥ 0).
        l1_warm_up_steps: steps over which λ ramps linearly from 0 (≥ 0).
        aux_coefficient: α, weight of the auxiliary gate-path reconstruction through a
            frozen decoder copy (≥ 0; 0 drops the term, the paper's collapse ablation).
        tie_radii: one radius ρ = ρ⁺ = ρ⁻ per latent (the paper's recommended default).
        two_sided: open the negative gate; False gives a one-sided JumpReLU-gated SAE.
        initial_threshold: starting θ⁺ = θ⁻ in units of the SAE input (> 0).
        bandwidth: ε, width of the straight-through kernel for the thresholds (> 0).
        dead_threshold_reset: at every training step, for latents in the trainer's dead
            mask (no firing for ``dead_feature_window`` steps), lower θ⁺ and θ⁻ back to
            ``initial_threshold`` if they grew above it.
    """

    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0
    aux_coefficient: float = 1.0
    tie_radii: bool = True
    two_sided: bool = True
    initial_threshold: float = 1e-3
    bandwidth: float = 0.05
    dead_threshold_reset: bool = True

    def __post_init__(self) -> None:
        for name in ("l1_coefficient", "aux_coefficient"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.l1_warm_up_steps, int) and self.l1_warm_up_steps >= 0):
            raise ValueError(
                f"l1_warm_up_steps must be an integer >= 0, got {self.l1_warm_up_steps!r}"
            )
        for name in ("initial_threshold", "bandwidth"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        _check_whitening_foldable(self, only_if_whitening=True)
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


AnyConfig = SignAwareGatedSAEConfig | SignAwareGatedTrainingSAEConfig


def _check_whitening_foldable(cfg: AnyConfig, *, only_if_whitening: bool = False) -> None:
    """Raise if an input mean cannot be folded: two-sided without ``apply_b_dec_to_input``.

    The mean's projection would need opposite corrections of the single ``b_mag`` on the
    positive and negative magnitude paths. With ``only_if_whitening`` (config time) the
    check applies only when ``normalize_activations="covariance_whitening"``.
    """
    if only_if_whitening and cfg.normalize_activations != "covariance_whitening":
        return
    if cfg.two_sided and not cfg.apply_b_dec_to_input:
        raise ValueError(
            "folding a covariance whitening into a two_sided=True sign_aware_gated SAE requires "
            "apply_b_dec_to_input=True (got False): the whitening mean would need opposite "
            "corrections of the single b_mag on the positive and negative magnitude paths."
        )


class _SignAwareGatedMixin:
    """Code shared by the inference and training classes (they hold the same parameters)."""

    cfg: AnyConfig
    dtype: torch.dtype
    device: torch.device
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    b_gate: nn.Parameter
    b_mag: nn.Parameter
    r_mag: nn.Parameter
    r_mag_neg: nn.Parameter | None
    hook_sae_acts_pre: Callable[[torch.Tensor], torch.Tensor]
    hook_sae_acts_post: Callable[[torch.Tensor], torch.Tensor]
    process_sae_in: Callable[[torch.Tensor], torch.Tensor]

    @property
    def threshold_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 SAE."""
        return torch.promote_types(self.dtype, torch.float32)

    def _init_sign_aware_params(self) -> None:
        def zeros() -> nn.Parameter:
            return nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

        self.b_gate = zeros()
        self.b_mag = zeros()
        self.r_mag = zeros()
        self.r_mag_neg = zeros() if self.cfg.two_sided and not self.cfg.tie_radii else None

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(θ⁺, θ⁻) in linear space; θ⁻ is None when ``two_sided=False``."""
        raise NotImplementedError

    def radii(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ρ⁺, ρ⁻); the same tensor twice when the radii are tied."""
        return self.r_mag, self.r_mag if self.r_mag_neg is None else self.r_mag_neg

    def _encode(self, x: torch.Tensor, gates: Gates) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed latents f and the gate pre-activation π for input ``x``."""
        check_sae_input(self, x)  # width (always), NaN/Inf (opt-in): sae_ext.validation
        sae_in = self.process_sae_in(x)
        mu = sae_in @ self.W_enc
        pi = self.hook_sae_acts_pre(mu + self.b_gate)
        gate_pos, gate_neg = gates(pi)
        rho_pos, rho_neg = self.radii()
        acts = gate_pos * torch.relu(mu * rho_pos.exp() + self.b_mag)
        if gate_neg is not None and self.cfg.two_sided:
            acts = acts - gate_neg * torch.relu(-mu * rho_neg.exp() + self.b_mag)
        return self.hook_sae_acts_post(acts), pi

    @torch.no_grad()
    def _fold_gate_and_magnitude(self, W_dec_norms: torch.Tensor) -> None:
        """Scale the biases like W_enc's columns (ρ needs nothing: W_enc carries the scale)."""
        self.b_gate.data.mul_(W_dec_norms)
        self.b_mag.data.mul_(W_dec_norms)

    @torch.no_grad()
    def _fold_whitening_biases(self, mean: torch.Tensor) -> None:
        """Subtract the whitening mean's projection from the gate/magnitude biases.

        Only needed when ``apply_b_dec_to_input`` is False (otherwise the base class folds
        the mean into b_dec); supported for the one-sided model only, see
        :func:`_check_whitening_foldable`.
        """
        if self.cfg.apply_b_dec_to_input:
            return
        shift = mean.to(self.W_enc) @ self.W_enc
        self.b_gate.data.sub_(shift)
        self.b_mag.data.sub_(shift * self.r_mag.exp())

    def _sign_aware_histograms(self) -> dict[str, NDArray[Any]]:
        theta_pos, theta_neg = self.thresholds()
        out = {
            "weights/b_gate": self.b_gate.detach().float().cpu().numpy(),
            "weights/b_mag": self.b_mag.detach().float().cpu().numpy(),
            "weights/threshold_pos": theta_pos.detach().float().cpu().numpy(),
        }
        if theta_neg is not None:
            out["weights/threshold_neg"] = theta_neg.detach().float().cpu().numpy()
        return out


class SignAwareGatedSAE(_SignAwareGatedMixin, SAE[SignAwareGatedSAEConfig]):
    """Inference SA-GSAE: the SPEC §1 encoder with thresholds stored in linear space.

    ``fold_activation_norm_scaling_factor`` needs nothing beyond SAELens's base fold:
    scaling W_enc by the factor leaves μ, π, the biases and the thresholds unchanged.
    """

    b_gate: nn.Parameter
    b_mag: nn.Parameter
    r_mag: nn.Parameter
    threshold_pos: nn.Parameter
    threshold_neg: nn.Parameter | None

    def __init__(self, cfg: SignAwareGatedSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._init_sign_aware_params()
        zeros = torch.zeros(self.cfg.d_sae, dtype=self.threshold_dtype, device=self.device)
        self.threshold_pos = nn.Parameter(zeros.clone())
        self.threshold_neg = nn.Parameter(zeros.clone()) if self.cfg.two_sided else None

    @override
    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.threshold_pos, self.threshold_neg

    def _compare_gates(self, pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pi_c = pi.to(torch.promote_types(pi.dtype, self.threshold_pos.dtype))
        gate_pos = (pi_c > self.threshold_pos).to(pi.dtype)
        if self.threshold_neg is None:
            return gate_pos, None
        return gate_pos, (-pi_c > self.threshold_neg).to(pi.dtype)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x, self._compare_gates)[0]

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out_pre = feature_acts @ self.W_dec + self.b_dec
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """W_enc[:, i]·n_i, b_gate·n, b_mag·n, θ±·n, W_dec[i]/n_i (SPEC §1)."""
        norms = self.fold_and_get_W_dec_norm()
        self._fold_gate_and_magnitude(norms)
        for name in _THRESHOLDS:
            p = getattr(self, name)
            if p is not None:
                p.data.mul_(norms.to(p.dtype))

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        _check_whitening_foldable(self.cfg)
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)
        self._fold_whitening_biases(mean)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Accept training checkpoints too: convert log thresholds to linear space."""
        for log_name, name in zip(_LOG_THRESHOLDS, _THRESHOLDS):
            if log_name in state_dict:
                state_dict[name] = state_dict.pop(log_name).exp().contiguous()

    @override
    def _apply(self, *args: Any, **kwargs: Any) -> SignAwareGatedSAE:
        with keep_thresholds_at_least_float32(self, _THRESHOLDS):
            return super()._apply(*args, **kwargs)


class SignAwareGatedTrainingSAE(_SignAwareGatedMixin, TrainingSAE[SignAwareGatedTrainingSAEConfig]):
    """Training SA-GSAE (SPEC §1): straight-through gates, log thresholds, SPEC loss.

    Losses (``TrainStepOutput.losses``): ``mse_loss``, ``l1_loss`` (λ-weighted),
    ``auxiliary_reconstruction_loss`` (α-weighted; 0 when α = 0). Metrics
    (``TrainStepOutput.metrics``): ``l0``, ``positive_firing_share``,
    ``negative_firing_share``, ``mean_threshold_pos``, ``mean_threshold_neg`` (two-sided
    only) and ``dead_threshold_resets`` (latents whose thresholds the reset touched).

    The main reconstruction trains the magnitude path, the decoder and (through the step
    gates' pseudo-derivatives) the thresholds; the gate path W_enc/b_gate learns from the
    sparsity and auxiliary terms, as in a Gated SAE.
    """

    b_gate: nn.Parameter
    b_mag: nn.Parameter
    r_mag: nn.Parameter
    log_threshold_pos: nn.Parameter
    log_threshold_neg: nn.Parameter | None

    def __init__(self, cfg: SignAwareGatedTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # (π, gate code, l1 per token) of the last fused encode, consumed by calculate_aux_loss
        self._gate_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._init_sign_aware_params()
        log_init = torch.full(
            (self.cfg.d_sae,),
            math.log(self.cfg.initial_threshold),
            dtype=self.threshold_dtype,
            device=self.device,
        )
        self.log_threshold_pos = nn.Parameter(log_init.clone())
        self.log_threshold_neg = nn.Parameter(log_init.clone()) if self.cfg.two_sided else None

    @override
    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        theta_neg = None if self.log_threshold_neg is None else self.log_threshold_neg.exp()
        return self.log_threshold_pos.exp(), theta_neg

    def _ste_gates(self, pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        theta_pos, theta_neg = self.thresholds()
        gate_pos, gate_neg = two_sided_step(pi, theta_pos, theta_neg, self.cfg.bandwidth)
        return gate_pos, gate_neg if theta_neg is not None else None

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed latents f and the gate pre-activation π (the "hidden_pre").

        One fused autograd node (:class:`~sae_ext.activations.SignAwareGatedCodeFunction`)
        computes f together with the gate code BiJumpReLU(π) and the per-token sparsity
        penalty, which :meth:`calculate_aux_loss` reuses for the same π; gradients equal
        those of the unfused composition (``self._encode(x, self._ste_gates)``).
        """
        check_sae_input(self, x)
        mu = self._project(x)
        pi = self.hook_sae_acts_pre(mu + self.b_gate)
        theta_pos, theta_neg = self.thresholds()
        rho_pos, rho_neg = self.radii()
        if not self.cfg.two_sided:
            theta_neg = None
        acts, gate_acts, l1 = sign_aware_gated_code(
            mu, pi, self.b_mag, rho_pos, rho_neg, theta_pos, theta_neg, self.W_dec.norm(dim=1),
            self.cfg.bandwidth,
        )
        self._gate_cache = (pi, gate_acts, l1)
        return self.hook_sae_acts_post(acts), pi

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        acts, _ = self.encode_with_hidden_pre(x)
        self._gate_cache = None
        return acts

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """μ = (x − b_dec) W_enc as ``addmm(−b_dec W_enc, x, W_enc)``.

        Equal to ``process_sae_in(x) @ W_enc``, but b_dec's gradient through the encoder is
        then a vector–matrix product instead of a third (batch × d_sae × d_in) matmul.
        """
        x_in = self.run_time_activation_norm_fn_in(self.hook_sae_input(self.reshape_fn_in(x.to(self.dtype))))
        if not self.cfg.apply_b_dec_to_input:
            return x_in @ self.W_enc
        shape = x_in.shape
        mu = torch.addmm(-(self.b_dec @ self.W_enc), x_in.reshape(-1, shape[-1]), self.W_enc)
        return mu.reshape(*shape[:-1], mu.shape[-1])

    def gate_activations(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """BiJumpReLU(π): the gate-path code used by the sparsity and auxiliary terms."""
        theta_pos, theta_neg = self.thresholds()
        return bi_jump_relu(hidden_pre, theta_pos, theta_neg, self.cfg.bandwidth)

    def _gate_code_and_l1(self, hidden_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BiJumpReLU(π), Σ|·|·‖W_dec,i‖ per token): from the fused encode when it made this π."""
        cache, self._gate_cache = self._gate_cache, None
        if cache is not None and cache[0] is hidden_pre:
            return cache[1], cache[2]
        gate_acts = self.gate_activations(hidden_pre)
        return gate_acts, (gate_acts.abs() * self.W_dec.norm(dim=1)).sum(dim=-1)

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        gate_acts, l1_per_token = self._gate_code_and_l1(hidden_pre)
        l1 = l1_per_token.mean()
        losses = {"l1_loss": step_input.coefficients["l1"] * l1}
        if self.cfg.aux_coefficient > 0:
            via_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
            aux = (via_gate - step_input.sae_in).pow(2).sum(dim=-1).mean()
            losses["auxiliary_reconstruction_loss"] = self.cfg.aux_coefficient * aux
        else:
            losses["auxiliary_reconstruction_loss"] = l1.new_zeros(())
        return losses

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        check_training_input(self, step_input)  # before the threshold reset changes anything
        n_reset = self.reset_dead_thresholds(step_input.dead_neuron_mask)
        try:
            output = super().training_forward_pass(step_input)
        finally:
            self._gate_cache = None  # never keep a graph alive between steps
        if step_input.is_logging_step:  # six passes over the codes: only when the trainer logs
            output.metrics.update(self._firing_metrics(output.feature_acts))
        output.metrics["dead_threshold_resets"] = n_reset
        return output

    @torch.no_grad()
    def reset_dead_thresholds(self, dead_neuron_mask: torch.Tensor | None) -> torch.Tensor:
        """Lower θ⁺, θ⁻ of dead latents back to ``initial_threshold``; return how many changed.

        Does nothing when ``dead_threshold_reset`` is False or no mask is given. A
        threshold already at or below ``initial_threshold`` is left alone (raising it
        could only make the latent fire less). Runs on every step while a latent stays in
        the mask, which is idempotent; the optimizer's moments are not touched.
        """
        changed = torch.zeros(
            self.cfg.d_sae, dtype=torch.bool, device=self.log_threshold_pos.device
        )
        if not self.cfg.dead_threshold_reset or dead_neuron_mask is None:
            return changed.sum()
        dead = dead_neuron_mask.to(changed.device, torch.bool)
        log_init = math.log(self.cfg.initial_threshold)
        for name in _LOG_THRESHOLDS:
            p = getattr(self, name)
            if p is None:
                continue
            lower = dead & (p.data > log_init)
            changed |= lower
            p.data.copy_(torch.where(lower, torch.full_like(p.data, log_init), p.data))
        return changed.sum()

    @torch.no_grad()
    def _firing_metrics(self, feature_acts: torch.Tensor) -> dict[str, Any]:
        fired = feature_acts != 0
        n_fired = fired.sum().clamp(min=1)
        pos_share = (feature_acts > 0).sum() / n_fired
        theta_pos, theta_neg = self.thresholds()
        metrics: dict[str, Any] = {
            "l0": fired.sum(dim=-1).float().mean(),
            "positive_firing_share": pos_share,
            "negative_firing_share": (feature_acts < 0).sum() / n_fired,
            "mean_threshold_pos": theta_pos.mean(),
        }
        if theta_neg is not None:
            metrics["mean_threshold_neg"] = theta_neg.mean()
        return metrics

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "l1": TrainCoefficientConfig(
                value=self.cfg.l1_coefficient, warm_up_steps=self.cfg.l1_warm_up_steps
            )
        }

    @override
    def log_histograms(self) -> dict[str, NDArray[Any]]:
        return {**super().log_histograms(), **self._sign_aware_histograms()}

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """As :meth:`SignAwareGatedSAE.fold_W_dec_norm`, adding log n to the log thresholds."""
        norms = self.fold_and_get_W_dec_norm()
        self._fold_gate_and_magnitude(norms)
        for name in _LOG_THRESHOLDS:
            p = getattr(self, name)
            if p is not None:
                p.data.add_(norms.to(p.dtype).log())

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        _check_whitening_foldable(self.cfg)
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)
        self._fold_whitening_biases(mean)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Save thresholds in linear space (``threshold_pos``/``threshold_neg``)."""
        super().process_state_dict_for_saving_inference(state_dict)
        for log_name, name in zip(_LOG_THRESHOLDS, _THRESHOLDS):
            if log_name in state_dict:
                state_dict[name] = state_dict.pop(log_name).exp().contiguous()

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Accept inference weights too: convert linear thresholds to logs."""
        for log_name, name in zip(_LOG_THRESHOLDS, _THRESHOLDS):
            if name in state_dict:
                state_dict[log_name] = state_dict.pop(name).log().contiguous()

    @override
    def _apply(self, *args: Any, **kwargs: Any) -> SignAwareGatedTrainingSAE:
        with keep_thresholds_at_least_float32(self, _LOG_THRESHOLDS):
            return super()._apply(*args, **kwargs)


register_inference(ARCHITECTURE, SignAwareGatedSAE, SignAwareGatedSAEConfig)
register_training(ARCHITECTURE, SignAwareGatedTrainingSAE, SignAwareGatedTrainingSAEConfig)
