"""Sign-aware gated SAE (SA-GSAE v2, SPEC §1), registered as ``sign_aware_gated``.

A Gated SAE made two-sided: one latent can fire positive or negative along a single
decoder direction, so anticorrelated concepts ("too high" / "too low") share one latent::

    μ  = x̃ W_enc                               shared projection
    π  = μ + b_gate                            signed gate pre-activation (hook_sae_acts_pre)
    γ⁺ = H(π − θ⁺),  γ⁻ = H(−π − θ⁻)           polarity gates (disjoint, dead zone [−θ⁻, θ⁺])
    m⁺ = ReLU( e^{ρ⁺} μ + b_mag),  m⁻ = ReLU(−e^{ρ⁻} μ + b_mag)
    f  = γ⁺ m⁺ − γ⁻ m⁻                          signed latent (hook_sae_acts_post)
    x̂  = f W_dec + b_dec

    L  = ‖x − x̂‖² + λ₀ S(ℓ₀) + α ‖x − (g sg(W_dec) + sg(b_dec))‖²
         + λ_P Σ_i dead_i ReLU(min(θ⁺_i − π_i, π_i + θ⁻_i)) sg(‖W_dec,i‖)

with ℓ₀ = Σ_i (γ⁺_i + γ⁻_i) through the step's straight-through estimator, g = BiJumpReLU(π)
with sg(θ), and S as SAELens ``jumprelu`` (``step``, ``quadratic`` around ``target_l0``,
``tanh``). v2 replaces v1's L1 penalty and log-space thresholds, which left the codes dense.

Parameters: ``b_gate``, ``b_mag``, ``r_mag`` (ρ⁺, or the shared ρ when ``tie_radii``),
``r_mag_neg`` (ρ⁻, only when ``two_sided`` and not ``tie_radii``), and the linear thresholds
``threshold_pos`` / ``threshold_neg`` (the latter only when ``two_sided``), the same names in
the training and the inference SAE. Thresholds are float32 (float64 for a float64 SAE)
whatever the SAE dtype, ``.to(dtype)`` included, and gates are compared in that precision.
(SAELens's disk loader casts every saved tensor to the config dtype before loading, so a
bf16 SAE loaded from disk gets float32 thresholds holding bf16-rounded values.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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

SparsityLossMode = Literal["step", "quadratic", "tanh"]
BDecInit = Literal["mean", "geometric_median", "zeros"]
SPARSITY_LOSS_MODES: tuple[str, ...] = ("step", "quadratic", "tanh")
B_DEC_INITS: tuple[str, ...] = ("mean", "geometric_median", "zeros")

_THRESHOLDS = ("threshold_pos", "threshold_neg")
#: bool buffer of the training SAE: b_dec (and "auto" thresholds) already set from data
_INIT_FLAG = "data_initialized"

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
    """Configuration for training a :class:`SignAwareGatedTrainingSAE` (SPEC §1 v2).

    Names follow SAELens ``jumprelu`` where they mean the same. Coefficients are in units of
    the SAE's (normalised) input, e.g. E‖x‖² = d_in with
    ``normalize_activations="expected_average_only_in"``.

    Args:
        l0_coefficient: λ₀, weight of the sparsity loss S(ℓ₀) (≥ 0).
        l0_warm_up_steps: steps over which λ₀ ramps linearly from 0 (≥ 0).
        sparsity_loss_mode: S: ``"step"`` (ℓ₀, default), ``"quadratic"`` ((2/T)(ℓ₀ − T)² with
            ``target_l0`` T) or ``"tanh"`` (Σ_i tanh(c·|f_i|·‖W_dec,i‖), c = ``tanh_scale``).
        target_l0: T, required by ``"quadratic"`` (0 < T ≤ d_sae).
        tanh_scale: c of the ``"tanh"`` mode (> 0).
        pre_act_loss_coefficient: λ_P of the two-sided pre-activation loss on dead latents
            (≥ 0; None = off, as SAELens).
        ste_to_input: the gates' straight-through estimator also reaches π (so W_enc,
            b_gate), not only the thresholds (SAELens ``jumprelu_ste_to_input``).
        aux_coefficient: α, weight of the auxiliary gate-path reconstruction through a
            frozen decoder copy (≥ 0; 0 drops the term, the paper's collapse ablation).
        tie_radii: one radius ρ = ρ⁺ = ρ⁻ per latent (the paper's recommended default).
        two_sided: open the negative gate; False gives a one-sided JumpReLU-gated SAE.
        initial_threshold: starting θ⁺ = θ⁻ (≥ 0), or ``"auto"``: each latent's median |π|
            on the first training batch.
        bandwidth: ε, width of the straight-through kernel (> 0).
        b_dec_init: ``"mean"`` (default), ``"geometric_median"`` of the first training batch,
            or ``"zeros"``. Set lazily on that batch, before the optimiser has any state.
        dead_threshold_reset: at every training step, for latents in the trainer's dead
            mask (no firing for ``dead_feature_window`` steps), lower θ⁺ and θ⁻ back to their
            initial value (``initial_threshold``, or for ``"auto"`` the latent's median |π| on
            the current batch) if they grew above it.
    """

    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    sparsity_loss_mode: SparsityLossMode = "step"
    target_l0: float | None = None
    tanh_scale: float = 4.0
    pre_act_loss_coefficient: float | None = None
    ste_to_input: bool = False
    aux_coefficient: float = 1.0
    tie_radii: bool = True
    two_sided: bool = True
    initial_threshold: float | Literal["auto"] = 0.01
    bandwidth: float = 0.05
    b_dec_init: BDecInit = "mean"
    dead_threshold_reset: bool = True

    def __post_init__(self) -> None:
        _validate_training_config(self)
        _check_whitening_foldable(self, only_if_whitening=True)
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_training_config(cfg: SignAwareGatedTrainingSAEConfig) -> None:
    """One clear ``ValueError`` for the first bad setting, naming the value and what is allowed."""
    for name in ("l0_coefficient", "aux_coefficient"):
        value = getattr(cfg, name)
        if not (_is_number(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    value = cfg.pre_act_loss_coefficient
    if value is not None and not (_is_number(value) and value >= 0):
        raise ValueError(f"pre_act_loss_coefficient must be None (off) or a finite number >= 0, got {value!r}")
    if isinstance(cfg.l0_warm_up_steps, bool) or not (
        isinstance(cfg.l0_warm_up_steps, int) and cfg.l0_warm_up_steps >= 0
    ):
        raise ValueError(f"l0_warm_up_steps must be an integer >= 0, got {cfg.l0_warm_up_steps!r}")
    if cfg.sparsity_loss_mode not in SPARSITY_LOSS_MODES:
        raise ValueError(f"sparsity_loss_mode must be one of {SPARSITY_LOSS_MODES}, got {cfg.sparsity_loss_mode!r}")
    if cfg.sparsity_loss_mode == "quadratic" and cfg.target_l0 is None:
        raise ValueError(
            "target_l0 must be set when sparsity_loss_mode='quadratic' (the L0 the penalty "
            "(2/T)(ℓ₀ − T)² pulls towards), got None"
        )
    if cfg.target_l0 is not None and not (_is_number(cfg.target_l0) and 0 < cfg.target_l0 <= cfg.d_sae):
        raise ValueError(f"target_l0 must be a number in (0, d_sae = {cfg.d_sae}], got {cfg.target_l0!r}")
    for name in ("tanh_scale", "bandwidth"):
        value = getattr(cfg, name)
        if not (_is_number(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    theta = cfg.initial_threshold
    if theta != "auto" and not (_is_number(theta) and theta >= 0):
        raise ValueError(f"initial_threshold must be a finite number >= 0 or 'auto', got {theta!r}")
    if cfg.b_dec_init not in B_DEC_INITS:
        raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {cfg.b_dec_init!r}")
    for name in ("ste_to_input", "tie_radii", "two_sided", "dead_threshold_reset"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}")


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


@torch.no_grad()
def geometric_median(x: torch.Tensor, max_iter: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """The geometric median of the rows of ``x`` ``[n, d]`` (Weiszfeld's algorithm, float64).

    The point minimising the summed Euclidean distance to the rows: a mean that a few
    outlying tokens cannot drag (used for ``b_dec_init="geometric_median"``).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [n, d] tensor, got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp(min=1e-12)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        done = (y_next - y).norm() <= tol * max(1.0, float(y.norm()))
        y = y_next
        if done:
            break
    return y


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
    threshold_pos: nn.Parameter
    threshold_neg: nn.Parameter | None
    hook_sae_acts_pre: Callable[[torch.Tensor], torch.Tensor]
    hook_sae_acts_post: Callable[[torch.Tensor], torch.Tensor]
    process_sae_in: Callable[[torch.Tensor], torch.Tensor]
    fold_and_get_W_dec_norm: Callable[[], torch.Tensor]

    @property
    def threshold_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 SAE."""
        return torch.promote_types(self.dtype, torch.float32)

    def _init_sign_aware_params(self, initial_threshold: float) -> None:
        def zeros() -> nn.Parameter:
            return nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

        self.b_gate = zeros()
        self.b_mag = zeros()
        self.r_mag = zeros()
        self.r_mag_neg = zeros() if self.cfg.two_sided and not self.cfg.tie_radii else None
        theta = torch.full((self.cfg.d_sae,), initial_threshold, dtype=self.threshold_dtype, device=self.device)
        self.threshold_pos = nn.Parameter(theta.clone())
        self.threshold_neg = nn.Parameter(theta.clone()) if self.cfg.two_sided else None

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(θ⁺, θ⁻), linear; θ⁻ is None when ``two_sided=False``."""
        return self.threshold_pos, self.threshold_neg

    def radii(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ρ⁺, ρ⁻); the same tensor twice when the radii are tied."""
        return self.r_mag, self.r_mag if self.r_mag_neg is None else self.r_mag_neg

    def _encode(self, x: torch.Tensor, gates: Gates) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed latents f and the gate pre-activation π for input ``x`` ``[..., d_in]``."""
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
    def clamp_thresholds_(self) -> None:
        """Project θ⁺, θ⁻ back to ≥ 0 (in place; as SAELens ``jumprelu``, not in the graph)."""
        for name in _THRESHOLDS:
            p = getattr(self, name)
            if p is not None:
                p.data.clamp_(min=0.0)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """W_enc[:, i]·n_i, b_gate·n, b_mag·n, θ±·n, W_dec[i]/n_i (SPEC §1): outputs unchanged.

        ρ needs nothing: W_enc already carries the scale into μ.
        """
        norms = self.fold_and_get_W_dec_norm()
        self.b_gate.data.mul_(norms)
        self.b_mag.data.mul_(norms)
        for name in _THRESHOLDS:
            p = getattr(self, name)
            if p is not None:
                p.data.mul_(norms.to(p.dtype))

    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        """SAELens's whitening fold, plus the mean's shift of the gate/magnitude biases.

        The shift is needed only when ``apply_b_dec_to_input`` is False (otherwise the base
        class folds the mean into b_dec); supported for the one-sided model only, see
        :func:`_check_whitening_foldable`.
        """
        _check_whitening_foldable(self.cfg)
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)  # type: ignore[misc]
        if self.cfg.apply_b_dec_to_input:
            return
        shift = mean.to(self.W_enc) @ self.W_enc
        self.b_gate.data.sub_(shift)
        self.b_mag.data.sub_(shift * self.r_mag.exp())

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        with keep_thresholds_at_least_float32(self, _THRESHOLDS):  # type: ignore[arg-type]
            return super()._apply(*args, **kwargs)  # type: ignore[misc]

    def _sign_aware_histograms(self) -> dict[str, NDArray[Any]]:
        out = {
            "weights/b_gate": self.b_gate.detach().float().cpu().numpy(),
            "weights/b_mag": self.b_mag.detach().float().cpu().numpy(),
            "weights/threshold_pos": self.threshold_pos.detach().float().cpu().numpy(),
        }
        if self.threshold_neg is not None:
            out["weights/threshold_neg"] = self.threshold_neg.detach().float().cpu().numpy()
        return out


class SignAwareGatedSAE(_SignAwareGatedMixin, SAE[SignAwareGatedSAEConfig]):
    """Inference SA-GSAE: the SPEC §1 encoder with linear thresholds.

    ``fold_activation_norm_scaling_factor`` needs nothing beyond SAELens's base fold:
    scaling W_enc by the factor leaves μ, π, the biases and the thresholds unchanged.
    Accepts activations ``[..., d_in]`` with any leading dimensions.
    """

    def __init__(self, cfg: SignAwareGatedSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._init_sign_aware_params(0.0)

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
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Accept training checkpoints too: drop the training SAE's data-init flag."""
        state_dict.pop(_INIT_FLAG, None)


class SignAwareGatedTrainingSAE(_SignAwareGatedMixin, TrainingSAE[SignAwareGatedTrainingSAEConfig]):
    """Training SA-GSAE v2 (SPEC §1): L0-trained two-sided gates with straight-through θ.

    Losses (``TrainStepOutput.losses``): ``mse_loss``, ``l0_loss`` (λ₀·S(ℓ₀)),
    ``auxiliary_reconstruction_loss`` (α-weighted; 0 when α = 0) and, when
    ``pre_act_loss_coefficient`` is set, ``pre_act_loss``. Metrics
    (``TrainStepOutput.metrics``): ``dead_threshold_resets`` every step; on the trainer's
    logging steps ``l0``, ``positive_firing_share``, ``negative_firing_share``,
    ``mean_threshold_pos`` and ``mean_threshold_neg`` (two-sided only).

    The main reconstruction trains the magnitude path, the decoder and (through the step
    gates' pseudo-derivatives) the thresholds; the L0 term raises the thresholds; the gate
    path W_enc/b_gate learns from the auxiliary term (and from the gates' estimator with
    ``ste_to_input``). Thresholds are projected back to ≥ 0 before every forward, i.e. after
    the previous optimiser step (SAELens's trainer has no post-step hook; ``jumprelu`` does
    the same), and in the saved inference SAE. Accepts ``[..., d_in]`` inputs.
    """

    data_initialized: torch.Tensor  # bool scalar buffer (saved in training checkpoints)

    def __init__(self, cfg: SignAwareGatedTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # (π, gate code g, ℓ₀ per token) of the last fused encode, consumed by calculate_aux_loss
        self._gate_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        auto = self.cfg.initial_threshold == "auto"
        self._init_sign_aware_params(0.0 if auto else float(self.cfg.initial_threshold))
        pending = auto or self.cfg.b_dec_init != "zeros"
        self.register_buffer(_INIT_FLAG, torch.tensor(not pending, device=self.device))

    # ------------------------------------------------------------------ data-driven init

    def _processed(self, sae_in: torch.Tensor) -> torch.Tensor:
        """The batch as the encoder sees it before b_dec, flattened to ``[tokens, d_in]``."""
        x = self.run_time_activation_norm_fn_in(sae_in.to(self.dtype))
        return x.reshape(-1, self.cfg.d_in)

    @torch.no_grad()
    def _median_abs_pi(self, x: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Per-latent median |π| over the tokens ``x`` ``[tokens, d_in]`` (``"auto"`` thresholds)."""
        W_enc, b_gate = self.W_enc, self.b_gate
        if latents is not None:
            W_enc, b_gate = W_enc[:, latents], b_gate[latents]
        x_tilde = x - self.b_dec * self.cfg.apply_b_dec_to_input
        pi = x_tilde @ W_enc + b_gate
        return pi.abs().to(self.threshold_dtype).median(dim=0).values

    @torch.no_grad()
    def initialize_from_batch(self, sae_in: torch.Tensor) -> None:
        """Set b_dec (``b_dec_init``), then ``"auto"`` thresholds, from a training batch.

        Called by :meth:`training_forward_pass` on the first batch, before the optimiser has
        any state. A single ``b_mag`` is symmetric only about μ = 0, so an uncentred input
        would make every latent fire.
        """
        x = self._processed(sae_in)
        if x.shape[0] == 0:
            raise ValueError(f"cannot initialise b_dec from an empty batch (shape {tuple(sae_in.shape)})")
        if self.cfg.b_dec_init == "mean":
            self.b_dec.data.copy_(x.to(torch.float64).mean(0))
        elif self.cfg.b_dec_init == "geometric_median":
            self.b_dec.data.copy_(geometric_median(x))
        if self.cfg.initial_threshold == "auto":
            theta = self._median_abs_pi(x)
            for name in _THRESHOLDS:
                p = getattr(self, name)
                if p is not None:
                    p.data.copy_(theta)
        self.data_initialized.fill_(True)

    @torch.no_grad()
    def reset_dead_thresholds(
        self, dead_neuron_mask: torch.Tensor | None, sae_in: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Lower θ⁺, θ⁻ of dead latents back to their initial value; return how many changed.

        The initial value is ``initial_threshold``, or for ``"auto"`` the latent's median |π|
        on ``sae_in`` (required then). Does nothing when ``dead_threshold_reset`` is False or
        no mask is given. A threshold already at or below that value is left alone (raising
        it could only make the latent fire less). Runs on every step while a latent stays in
        the mask, which is idempotent; the optimizer's moments are not touched.
        """
        changed = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=self.threshold_pos.device)
        if not self.cfg.dead_threshold_reset or dead_neuron_mask is None:
            return changed.sum()
        dead = dead_neuron_mask.to(changed.device, torch.bool)
        if self.cfg.initial_threshold == "auto":
            if not bool(dead.any()):
                return changed.sum()
            if sae_in is None:
                raise ValueError("reset_dead_thresholds needs sae_in when initial_threshold='auto'")
            target = torch.full_like(self.threshold_pos, math.inf)
            target[dead] = self._median_abs_pi(self._processed(sae_in), dead)
        else:
            target = torch.full_like(self.threshold_pos, float(self.cfg.initial_threshold))
        for name in _THRESHOLDS:
            p = getattr(self, name)
            if p is None:
                continue
            lower = dead & (p.data > target)
            changed |= lower
            p.data.copy_(torch.where(lower, target, p.data))
        return changed.sum()

    # ------------------------------------------------------------------ forward

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed latents f and the gate pre-activation π (the "hidden_pre").

        One fused autograd node (:class:`~sae_ext.activations.SignAwareGatedCodeFunction`)
        computes f together with the gate code g = BiJumpReLU(π) (sg θ) and the per-token
        ℓ₀, which :meth:`calculate_aux_loss` reuses for the same π; gradients equal those of
        the unfused composition of the straight-through primitives.
        """
        check_sae_input(self, x)
        self.clamp_thresholds_()
        mu = self._project(x)
        pi = self.hook_sae_acts_pre(mu + self.b_gate)
        theta_pos, theta_neg = self.thresholds()
        rho_pos, rho_neg = self.radii()
        acts, gate_acts, l0 = sign_aware_gated_code(
            mu, pi, self.b_mag, rho_pos, rho_neg, theta_pos, theta_neg,
            self.cfg.bandwidth, self.cfg.ste_to_input,
        )
        self._gate_cache = (pi, gate_acts, l0)
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

    def gate_terms(self, hidden_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, ℓ₀) for π = ``hidden_pre`` from the straight-through primitives (unfused).

        g = BiJumpReLU(π) with the thresholds detached; ℓ₀ = Σ_i (γ⁺_i + γ⁻_i) per token.
        """
        theta_pos, theta_neg = self.thresholds()
        gate_pos, gate_neg = two_sided_step(
            hidden_pre, theta_pos, theta_neg, self.cfg.bandwidth, self.cfg.ste_to_input
        )
        l0 = (gate_pos + gate_neg).sum(-1, dtype=torch.promote_types(hidden_pre.dtype, theta_pos.dtype))
        theta_neg_sg = None if theta_neg is None else theta_neg.detach()
        return bi_jump_relu(hidden_pre, theta_pos.detach(), theta_neg_sg, self.cfg.bandwidth), l0

    def _cached_gate_terms(self, hidden_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache, self._gate_cache = self._gate_cache, None
        if cache is not None and cache[0] is hidden_pre:
            return cache[1], cache[2]
        return self.gate_terms(hidden_pre)

    def sparsity_loss(self, l0: torch.Tensor, feature_acts: torch.Tensor) -> torch.Tensor:
        """S per token: ℓ₀ (``step``), (2/T)(ℓ₀ − T)² (``quadratic``), Σ tanh(c|f|‖W_dec‖) (``tanh``)."""
        mode = self.cfg.sparsity_loss_mode
        if mode == "step":
            return l0
        if mode == "quadratic":
            target = float(self.cfg.target_l0)  # type: ignore[arg-type]  # checked by the config
            return 2.0 / target * (l0 - target) ** 2
        scaled = self.cfg.tanh_scale * feature_acts.abs() * self.W_dec.norm(dim=1)
        return torch.tanh(scaled).sum(dim=-1)

    def pre_act_loss(self, hidden_pre: torch.Tensor, dead_neuron_mask: torch.Tensor | None) -> torch.Tensor:
        """Σ_i dead_i ReLU(min(θ⁺_i − π_i, π_i + θ⁻_i)) sg(‖W_dec,i‖), mean over tokens (before λ_P).

        SAELens's pre-activation loss made two-sided: it pulls a dead latent's π towards the
        nearer edge of its dead zone (and that threshold towards π).
        """
        if dead_neuron_mask is None or not bool(dead_neuron_mask.any()):
            return hidden_pre.new_zeros((), dtype=self.threshold_dtype)
        dead = dead_neuron_mask.to(hidden_pre.device, torch.bool)
        pi = hidden_pre[..., dead]
        distance = self.threshold_pos[dead] - pi
        if self.threshold_neg is not None:
            distance = torch.minimum(distance, pi + self.threshold_neg[dead])
        norms = self.W_dec[dead].detach().norm(dim=-1)
        return (distance.relu() * norms).sum(dim=-1).mean()

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        gate_acts, l0 = self._cached_gate_terms(hidden_pre)
        sparsity = self.sparsity_loss(l0, feature_acts).mean()
        losses = {"l0_loss": step_input.coefficients["l0"] * sparsity}
        if self.cfg.aux_coefficient > 0:
            via_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
            aux = (via_gate - step_input.sae_in).pow(2).sum(dim=-1).mean()
            losses["auxiliary_reconstruction_loss"] = self.cfg.aux_coefficient * aux
        else:
            losses["auxiliary_reconstruction_loss"] = sparsity.new_zeros(())
        if self.cfg.pre_act_loss_coefficient is not None:
            pre_act = self.pre_act_loss(hidden_pre, step_input.dead_neuron_mask)
            losses["pre_act_loss"] = self.cfg.pre_act_loss_coefficient * pre_act
        return losses

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        check_training_input(self, step_input)  # before the data init or reset changes anything
        if not bool(self.data_initialized):
            self.initialize_from_batch(step_input.sae_in)
        self.clamp_thresholds_()
        n_reset = self.reset_dead_thresholds(step_input.dead_neuron_mask, step_input.sae_in)
        try:
            output = super().training_forward_pass(step_input)
        finally:
            self._gate_cache = None  # never keep a graph alive between steps
        if step_input.is_logging_step:  # passes over the codes: only when the trainer logs
            output.metrics.update(self._firing_metrics(output.feature_acts))
        output.metrics["dead_threshold_resets"] = n_reset
        return output

    @torch.no_grad()
    def _firing_metrics(self, feature_acts: torch.Tensor) -> dict[str, Any]:
        fired = feature_acts != 0
        n_fired = fired.sum().clamp(min=1)
        metrics: dict[str, Any] = {
            "l0": fired.sum(dim=-1).float().mean(),
            "positive_firing_share": (feature_acts > 0).sum() / n_fired,
            "negative_firing_share": (feature_acts < 0).sum() / n_fired,
            "mean_threshold_pos": self.threshold_pos.mean(),
        }
        if self.threshold_neg is not None:
            metrics["mean_threshold_neg"] = self.threshold_neg.mean()
        return metrics

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "l0": TrainCoefficientConfig(
                value=self.cfg.l0_coefficient, warm_up_steps=self.cfg.l0_warm_up_steps
            )
        }

    @override
    def log_histograms(self) -> dict[str, NDArray[Any]]:
        return {**super().log_histograms(), **self._sign_aware_histograms()}

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Drop the data-init flag; save the thresholds projected to ≥ 0."""
        super().process_state_dict_for_saving_inference(state_dict)
        state_dict.pop(_INIT_FLAG, None)
        for name in _THRESHOLDS:
            if name in state_dict:
                state_dict[name] = state_dict[name].clamp(min=0.0).contiguous()

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Accept inference weights too (they are trained, so no data init is pending), and
        restore the flag's dtype (SAELens's disk loader casts every tensor to the SAE dtype)."""
        flag = state_dict.get(_INIT_FLAG)
        state_dict[_INIT_FLAG] = torch.tensor(True) if flag is None else flag.to(torch.bool)


register_inference(ARCHITECTURE, SignAwareGatedSAE, SignAwareGatedSAEConfig)
register_training(ARCHITECTURE, SignAwareGatedTrainingSAE, SignAwareGatedTrainingSAEConfig)
