"""Scaffolded SAEs (SPEC §2; Deng et al., arXiv 2606.14040).

A rank-r linear bottleneck runs in parallel with a BatchTopK (or Matryoshka-BatchTopK)
sparse dictionary and absorbs the dense, low-rank "computational scaffold" of the
activations that otherwise shows up as dense latents::

    x̃ = x − b_dec                                   (when apply_b_dec_to_input)
    s  = (x̃ V) U            V ∈ R^{d_in×r}, U ∈ R^{r×d_in}      (hook_scaffold)
    f  = BatchTopK_k((x̃ − s) W_enc + b_enc) "residual" encoder input (default from v2)
       = BatchTopK_k(x̃ W_enc + b_enc)       "full" encoder input (parallel; an ablation)
    x̂  = f W_dec + s + b_dec

v2 (SPEC §2): the encoder sees x̃ − s by default; the PCA init (first training batch, which the
SPEC §8 protocol has already cleared of special tokens) sets U = Vᵀ = its top-r principal
directions *and* ``b_dec`` to its mean, so at init ``s + b_dec`` is exactly the rank-r PCA
reconstruction ``μ + (x − μ) V Vᵀ`` of the batch. Two training options, both off by default:

- ``scaffold_tied``: U = Vᵀ, with V re-orthonormalised (QR) after every optimiser step. The
  forward uses ``U`` with its gradient routed to V (U itself gets none), and a global
  ``torch.optim`` step post-hook — public torch API, filtered to optimisers that hold this SAE's
  V — re-orthonormalises V and copies U ← Vᵀ right after each step, the last one included, so
  the saved (untied) inference SAE is the tied map. A retraction at the start of
  ``training_forward_pass`` covers optimisers that bypass ``torch.optim`` hooks.
- ``scaffold_lr_scale`` c: the scaffold's learning rate relative to the SAE's. SAELens builds
  one Adam over ``sae.parameters()`` and Adam is invariant to a constant gradient scale, so a
  gradient hook would change nothing. Instead the parameters hold V / c and U / c and the
  forward multiplies by c: an Adam step moves the stored value by ~lr, the effective V, U by
  ~c·lr. Training checkpoints store the scaled values; the inference SAE stores V and U.

Architectures: ``scaffold_batchtopk`` and ``scaffold_matryoshka_batchtopk`` (training), both
saved as ``scaffold_jumprelu`` (JumpReLU with the learned BatchTopK threshold, plus U, V),
the way SAELens saves BatchTopK as JumpReLU. The training classes subclass SAELens's
``BatchTopKTrainingSAE`` / ``MatryoshkaBatchTopKTrainingSAE``; the scaffold logic lives in
two small mixins.

How the scaffold reaches ``decode``: SAELens's splice (``HookedSAETransformer``,
``SAETransformerBridge``) and evals call ``sae.encode(x)`` and then ``sae.decode(f)``, and
``decode`` only sees the latents. So ``encode`` (through ``process_sae_in``) computes ``s``
and leaves it pending on the module, and the next ``decode`` consumes it — the same pattern
SAELens uses for ``constant_norm_rescale`` (``x_norm_coeff``) and ``layer_norm``. A
``decode`` with nothing pending (e.g. decoding hand-made latents for steering) has no
scaffold term: the scaffold is a function of the input, not of the latents.

``hook_scaffold`` sits on the reconstruction path only: editing it changes the output by
exactly the edit and never the latents (in ``"residual"`` mode the encoder subtracts the
unhooked ``s``). Spliced into a model it is ``<hook_name>.hook_scaffold``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import act_times_W_dec
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformer_lens.hook_points import HookPoint
from typing_extensions import override

from sae_ext.activations import keep_thresholds_at_least_float32
from sae_ext.evaluation_spec import EvaluationSpec
from sae_ext.metrics.dense import DENSE_THRESHOLD, dense_fraction, firing_counts
from sae_ext.metrics.pca import top_pca_basis
from sae_ext.registry import register_inference, register_training
from sae_ext.validation import (
    check_matryoshka_widths,
    check_sae_input,
    check_topk_k,
    check_training_input,
    check_unit_interval,
)

ScaffoldInit = Literal["pca", "random"]
ScaffoldEncoderInput = Literal["full", "residual"]
SCAFFOLD_INITS: tuple[str, ...] = ("pca", "random")
SCAFFOLD_ENCODER_INPUTS: tuple[str, ...] = ("full", "residual")

#: Default scaffold rank. The paper used 24 on Gemma-2-2B (d_in = 2304). The default must be
#: < d_in at every width defaults are used at, including d_in = 32 test SAEs, so it is 8; on a
#: real residual stream set it explicitly (e.g. ``scaffold_rank=24`` as in the paper).
DEFAULT_SCAFFOLD_RANK = 8


# --------------------------------------------------------------------------- configs


def _validate_scaffold_cfg(cfg: Any, *, training: bool) -> None:
    """Check the scaffold fields of ``cfg``; raise before any weights exist."""
    r = cfg.scaffold_rank
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r < cfg.d_in:
        raise ValueError(
            f"scaffold_rank must be an integer with 1 <= scaffold_rank < d_in "
            f"(allowed: 1..{cfg.d_in - 1} for d_in = {cfg.d_in}); got {r!r}"
        )
    if cfg.scaffold_encoder_input not in SCAFFOLD_ENCODER_INPUTS:
        raise ValueError(
            f"scaffold_encoder_input must be one of {SCAFFOLD_ENCODER_INPUTS}; "
            f"got {cfg.scaffold_encoder_input!r}"
        )
    if training and cfg.scaffold_init not in SCAFFOLD_INITS:
        raise ValueError(
            f"scaffold_init must be one of {SCAFFOLD_INITS}; got {cfg.scaffold_init!r}"
        )
    if training and not isinstance(cfg.scaffold_tied, bool):
        raise ValueError(f"scaffold_tied must be True or False; got {cfg.scaffold_tied!r}")
    if training:
        c = cfg.scaffold_lr_scale
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c > 0):
            raise ValueError(
                f"scaffold_lr_scale must be a finite number > 0 (the scaffold's learning rate "
                f"relative to the SAE's, e.g. 0.1); got {c!r}"
            )
    if training:  # SAELens's BatchTopK configs check neither (k > d_sae fails deep in topk)
        check_topk_k(cfg.k, cfg.d_sae)
        check_unit_interval("topk_threshold_lr", cfg.topk_threshold_lr)


@dataclass
class ScaffoldJumpReLUSAEConfig(JumpReLUSAEConfig):
    """Inference config of a scaffolded SAE: JumpReLU plus a rank-``scaffold_rank`` scaffold.

    Args:
        scaffold_rank (int): rank r of the scaffold ``s = (x̃ V) U``; 1 <= r < d_in.
        scaffold_encoder_input (str): ``"residual"`` (default from v2: the encoder sees
            x̃ − s) or ``"full"`` (x̃). Saved configs carry the field, so v1 SAEs load as "full".
    """

    scaffold_rank: int = DEFAULT_SCAFFOLD_RANK
    scaffold_encoder_input: ScaffoldEncoderInput = "residual"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "scaffold_jumprelu"

    def __post_init__(self) -> None:
        _validate_scaffold_cfg(self, training=False)
        super().__post_init__()


@dataclass
class _ScaffoldTrainingFields:
    """The scaffold fields shared by both training configs (dataclass mixin).

    Args:
        scaffold_rank (int): Rank r of the scaffold s = (x̃ V) U, 1 <= r < d_in. Default 8:
            the paper used 24 on Gemma-2-2B, but the default must stay below d_in at every
            width it is used at, including d_in = 32 test SAEs.
        scaffold_init (str): "pca" (default): on the first training batch (special tokens
            already out, SPEC §8) set U = Vᵀ = its top-r principal directions and b_dec = its
            mean; "random": U = Vᵀ = a random orthonormal r-frame at construction.
        scaffold_encoder_input (str): "residual" (default from v2): the encoder sees x̃ − s;
            "full" (an ablation): the encoder sees x̃, the scaffold runs in parallel.
        scaffold_tied (bool): U = Vᵀ with V re-orthonormalised after every optimiser step
            (default False).
        scaffold_lr_scale (float): the scaffold's learning rate relative to the SAE's, > 0
            (default 1.0), by reparametrisation (see the module docstring).
    """

    scaffold_rank: int = DEFAULT_SCAFFOLD_RANK
    scaffold_init: ScaffoldInit = "pca"
    scaffold_encoder_input: ScaffoldEncoderInput = "residual"
    scaffold_tied: bool = False
    scaffold_lr_scale: float = 1.0


@dataclass
class ScaffoldBatchTopKTrainingSAEConfig(_ScaffoldTrainingFields, BatchTopKTrainingSAEConfig):
    """Training config of ``scaffold_batchtopk``: SAELens BatchTopK plus a rank-r scaffold.

    Scaffold fields: see ``_ScaffoldTrainingFields``; everything else: see
    ``BatchTopKTrainingSAEConfig``.
    """

    @override
    @classmethod
    def architecture(cls) -> str:
        return "scaffold_batchtopk"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return ScaffoldJumpReLUSAEConfig

    def __post_init__(self) -> None:
        _validate_scaffold_cfg(self, training=True)
        super().__post_init__()


def default_matryoshka_widths(d_sae: int) -> list[int]:
    """Nested widths used when ``matryoshka_widths`` is left empty: d_sae/64, /16, /4, d_sae.

    Levels grow ×4 (as in Bussmann et al.'s Matryoshka SAEs); widths below 1 and repeats are
    dropped, and the last level is always ``d_sae``.
    """
    widths = sorted({d_sae // 4**i for i in (3, 2, 1, 0)} - {0})
    return widths


@dataclass
class ScaffoldMatryoshkaBatchTopKTrainingSAEConfig(
    _ScaffoldTrainingFields, MatryoshkaBatchTopKTrainingSAEConfig
):
    """Training config of ``scaffold_matryoshka_batchtopk``: Matryoshka BatchTopK plus a scaffold.

    The scaffold is part of every nested level's reconstruction
    (level m: ``b_dec + s + Σ_{latents < width_m} f W_dec``), so each level only has to explain
    what the scaffold leaves over.

    ``matryoshka_widths``: positive integers, strictly increasing, ending at ``d_sae``, checked
    here with an error naming the widths (SAELens checks only at SAE construction, without
    naming them, and appends a missing ``d_sae`` with a warning; here that is an error). An
    empty list — SAELens's default, which SAELens rejects — is replaced by
    ``default_matryoshka_widths(d_sae)`` so the defaults train as they are. Run-time
    ``normalize_activations`` of ``"constant_norm_rescale"`` and ``"layer_norm"`` are
    refused: SAELens's Matryoshka re-applies the output normalisation once per level, which
    those stateful normalisations do not support.
    """

    @override
    @classmethod
    def architecture(cls) -> str:
        return "scaffold_matryoshka_batchtopk"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return ScaffoldJumpReLUSAEConfig

    def __post_init__(self) -> None:
        _validate_scaffold_cfg(self, training=True)
        if self.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported by "
                "scaffold_matryoshka_batchtopk; use one of 'none', 'expected_average_only_in', "
                "'covariance_whitening'"
            )
        if not self.matryoshka_widths:
            self.matryoshka_widths = default_matryoshka_widths(self.d_sae)
        check_matryoshka_widths(self.matryoshka_widths, self.d_sae)
        super().__post_init__()


# --------------------------------------------------------------------------- shared core


def _random_orthonormal(d: int, r: int) -> torch.Tensor:
    """A ``[d, r]`` matrix with orthonormal columns, drawn from the global torch RNG (on CPU)."""
    q, rr = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0
    return q * signs  # sign fix makes the frame uniformly (Haar) distributed


class _ScaffoldCore:
    """Scaffold parameters, hook and linear algebra shared by the training and inference SAEs.

    Must precede an SAELens SAE class in the bases (it calls ``super()`` into it).
    """

    cfg: Any
    dtype: torch.dtype
    device: torch.device
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    scaffold_V: nn.Parameter  # [d_in, r]
    scaffold_U: nn.Parameter  # [r, d_in]
    hook_scaffold: HookPoint
    _pending_scaffold: torch.Tensor | None

    def _init_scaffold_hook(self) -> None:
        # [..., d_in]: the scaffold's contribution s = (x̃ V) U to the reconstruction
        self.hook_scaffold = HookPoint()
        self._pending_scaffold = None
        self.setup()  # type: ignore[attr-defined]  # re-collect hook_dict with hook_scaffold

    def _make_scaffold_params(self, random_frame: bool) -> None:
        d, r = self.cfg.d_in, self.cfg.scaffold_rank
        if random_frame and self.device.type != "meta":
            v = (_random_orthonormal(d, r) / self._scaffold_scale()).to(self.dtype)
        else:
            v = torch.zeros(d, r, dtype=self.dtype)
        self.scaffold_V = nn.Parameter(v.to(self.device).contiguous())
        # a copy: at rank 1, v.T is already contiguous, so U would share V's storage (coupled
        # optimizer updates, and safetensors refuses to save shared tensors)
        self.scaffold_U = nn.Parameter(
            v.T.to(self.device).clone(memory_format=torch.contiguous_format)
        )

    def evaluation_spec(self) -> EvaluationSpec:
        """``evaluate_sae`` zeroes ``hook_scaffold``, compares with top-r PCA removal and measures
        the principal angles between the scaffold's range and those PCA directions."""
        return EvaluationSpec(
            ablation_hook="hook_scaffold",
            ablation_pca_rank=self.cfg.scaffold_rank,
            ablation_subspace=self.scaffold_subspace(),
        )

    def _scaffold_scale(self) -> float:
        """``scaffold_lr_scale`` c (training configs; 1 for the inference SAE): the parameters
        hold V / c and U / c."""
        return float(getattr(self.cfg, "scaffold_lr_scale", 1.0))

    def scaffold_frames(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective ``(V [d_in, r], U [r, d_in])`` of ``s = (x̃ V) U`` (differentiable).

        ``V = c · scaffold_V``, ``U = c · scaffold_U`` with c = ``scaffold_lr_scale``. Tied
        (``scaffold_tied``): U has the value of ``c · scaffold_U`` (kept equal to Vᵀ after every
        optimiser step) but its gradient flows to V, as for ``U = Vᵀ``.
        """
        c = self._scaffold_scale()
        v = self.scaffold_V if c == 1.0 else self.scaffold_V * c
        u = self.scaffold_U if c == 1.0 else self.scaffold_U * c
        if getattr(self.cfg, "scaffold_tied", False):
            u = v.T + (u - v.T).detach()
        return v, u

    def scaffold_map(self, x_tilde: torch.Tensor) -> torch.Tensor:
        """The scaffold ``s = (x̃ V) U`` of an already-processed input ``x̃`` ``[..., d_in]``."""
        v, u = self.scaffold_frames()
        return (x_tilde @ v) @ u

    @torch.no_grad()
    def _set_scaffold_frames(self, v: torch.Tensor, u: torch.Tensor) -> None:
        """Store effective ``V``, ``U`` (divided by ``scaffold_lr_scale`` into the parameters)."""
        c = self._scaffold_scale()
        self.scaffold_V.data.copy_((v / c).to(self.scaffold_V.dtype))
        self.scaffold_U.data.copy_((u / c).to(self.scaffold_U.dtype))

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """SAELens's input processing, then compute ``s`` (left pending for ``decode``).

        Returns the encoder's input: ``x̃`` (``"full"``) or ``x̃ − s`` (``"residual"``).
        """
        check_sae_input(self, sae_in)  # width (always), NaN/Inf (opt-in): sae_ext.validation
        x_tilde = super().process_sae_in(sae_in)  # type: ignore[misc]
        s = self.scaffold_map(x_tilde)
        self._pending_scaffold = s
        if self.cfg.scaffold_encoder_input == "residual":
            return x_tilde - s
        return x_tilde

    def _take_scaffold(self, feature_acts: torch.Tensor) -> torch.Tensor | None:
        """Consume the pending scaffold for ``feature_acts`` and pass it through ``hook_scaffold``."""
        s = self._pending_scaffold
        self._pending_scaffold = None
        if s is None:
            return None
        if s.shape[:-1] != feature_acts.shape[:-1]:
            raise ValueError(
                "decode() got latents of leading shape "
                f"{tuple(feature_acts.shape[:-1])} but the pending scaffold from the last "
                f"encode() has leading shape {tuple(s.shape[:-1])}; call encode() and decode() "
                "in pairs on the same input"
            )
        return self.hook_scaffold(s)

    def scaffold(self, x: torch.Tensor) -> torch.Tensor:
        """The scaffold contribution ``s`` for a raw input ``x`` ``[..., d_in]`` (hooks not applied).

        In the SAE's processed input space (after any run-time normalisation).
        """
        check_sae_input(self, x)
        x_tilde = super().process_sae_in(x)  # type: ignore[misc]
        return self.scaffold_map(x_tilde)

    @torch.no_grad()
    def scaffold_subspace(self) -> torch.Tensor:
        """Orthonormal basis ``[d_in, r]`` of the range of the scaffold map ``x̃ ↦ x̃ V U``.

        Columns are ordered by the map's singular values (largest first). The map has rank r
        generically; directions with zero singular value would be arbitrary, and are kept
        only so the shape is fixed.
        """
        v, u = (t.detach().to(torch.float64) for t in self.scaffold_frames())
        q, rr = torch.linalg.qr(v)  # V U = Q (R U)
        _, _, vh = torch.linalg.svd(rr @ u, full_matrices=False)
        return vh.T.to(self.dtype)

    @torch.no_grad()
    def fold_activation_whitening(
        self,
        mean: torch.Tensor,
        whitening_matrix: torch.Tensor,
        unwhitening_matrix: torch.Tensor,
    ) -> None:
        """SAELens's whitening fold, extended to the scaffold.

        With whitened inputs ``z = (x − m) M``: ``V ← M V``, ``U ← U M⁻¹``; when
        ``apply_b_dec_to_input`` is False the scaffold's response to the mean is moved into
        the biases (``b_dec −= m V'U'`` and, in ``"residual"`` mode, ``b_enc += m V'U' W_enc'``).
        """
        apply_b_dec = bool(self.cfg.apply_b_dec_to_input)
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)  # type: ignore[misc]
        dtype = torch.promote_types(self.scaffold_V.dtype, whitening_matrix.dtype)
        m_white = whitening_matrix.to(self.device, dtype)
        m_unwhite = unwhitening_matrix.to(self.device, dtype)
        v_eff, u_eff = (t.detach().to(dtype) for t in self.scaffold_frames())
        v, u = m_white @ v_eff, u_eff @ m_unwhite
        self._set_scaffold_frames(v, u)
        if not apply_b_dec:
            mean_s = (mean.to(self.device, dtype) @ v) @ u
            self.b_dec.data.sub_(mean_s.to(self.b_dec.dtype))
            if self.cfg.scaffold_encoder_input == "residual":
                self.b_enc.data.add_((mean_s @ self.W_enc.data.to(dtype)).to(self.b_enc.dtype))


# --------------------------------------------------------------------------- inference


class ScaffoldJumpReLUSAE(_ScaffoldCore, JumpReLUSAE):
    """Inference scaffolded SAE: SAELens JumpReLU plus the scaffold ``s = (x̃ V) U``.

    ``fold_W_dec_norm`` (JumpReLU's) leaves U, V alone: s does not involve W_dec.
    ``fold_activation_norm_scaling_factor`` (SAELens's) needs no scaffold change either: s
    is linear in x̃, so dividing x̃ by the factor divides s by it, as the fold requires.
    """

    cfg: ScaffoldJumpReLUSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: ScaffoldJumpReLUSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._init_scaffold_hook()

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self._make_scaffold_params(random_frame=False)  # loaded from disk
        # JumpReLU creates the threshold in the SAE dtype; a bf16 SAE (e.g. loaded with
        # dtype="bfloat16") then gates in bf16. Keep it float32 (float64 for a float64 SAE),
        # as ``_apply`` does for casts; bf16-saved values load bf16-rounded but compare in float32.
        self.threshold = nn.Parameter(
            self.threshold.data.to(torch.promote_types(self.dtype, torch.float32))
        )

    @override
    def _apply(self, *args: Any, **kwargs: Any) -> ScaffoldJumpReLUSAE:
        """Keep the JumpReLU threshold in (at least) float32 when the SAE is cast to bf16/fp16."""
        with keep_thresholds_at_least_float32(self, ("threshold",)):
            return super()._apply(*args, **kwargs)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """``x̂ = f W_dec + s + b_dec`` (s from the last ``encode``), then SAELens's output steps."""
        s = self._take_scaffold(feature_acts)
        sae_out_pre = feature_acts @ self.W_dec + self.b_dec
        if s is not None:
            sae_out_pre = sae_out_pre + s
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)


# --------------------------------------------------------------------------- training


def _variance_share(s: torch.Tensor, recon: torch.Tensor) -> float:
    """Var(s) / Var(x̂): total variance over dimensions, centred over tokens (float64)."""
    s2 = s.reshape(-1, s.shape[-1]).double()
    r2 = recon.reshape(-1, recon.shape[-1]).double()
    var_recon = (r2 - r2.mean(0)).pow(2).sum()
    var_s = (s2 - s2.mean(0)).pow(2).sum()
    return float((var_s / var_recon.clamp(min=1e-12)).item())


#: tied scaffold SAE -> its optimiser step post-hook handle (see ``_watch_optimiser_steps``)
_TIED_STEP_HOOKS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _forget_scaffold_initialized(module: Any, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: re-read ``scaffold_initialized`` at the next step."""
    del incompatible_keys
    module._scaffold_known_initialized = False


class _ScaffoldTrainingMixin(_ScaffoldCore):
    """Training-side scaffold logic shared by the BatchTopK and Matryoshka classes.

    Adds: the scaffold parameters; PCA initialisation on the first training batch; the
    scaffold term in ``decode``; training metrics; dropping training-only state on save.

    Metrics (``TrainStepOutput.metrics``; zero-argument callables, which SAELens's trainer
    evaluates on logging steps only, so a step never waits for a value on the host):
      - ``scaffold_variance_share``: Var(s) / Var(x̂) on the batch (total variance over
        dimensions, centred over tokens) — the part of the reconstruction the scaffold carries
        (s and the sparse part may correlate, so shares need not add up to 1).
      - ``dense_latent_fraction``: fraction of latents firing on > 10 % of the tokens seen
        since the last logging step. A running counter (int64 buffers ``dense_window_counts``
        and ``dense_window_tokens``) accumulates every training step and is reset after each
        step with ``is_logging_step``; ``dense_latent_fraction_batch`` is the same on this
        batch alone. The counter is saved in training checkpoints (so a resumed run logs what
        an uninterrupted one would) and dropped from the inference SAE.

    Training checkpoints written before the counter existed still load (it starts at zero).
    """

    scaffold_initialized: torch.Tensor  # bool scalar buffer (saved in training checkpoints)
    dense_window_counts: torch.Tensor  # int64 [d_sae] buffer (saved in training checkpoints)
    dense_window_tokens: torch.Tensor  # int64 scalar buffer (saved in training checkpoints)

    def __init__(self, cfg: Any, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[call-arg]
        self._init_scaffold_hook()
        self._record_scaffold = False
        self._last_scaffold: torch.Tensor | None = None
        # host-side copy of ``scaffold_initialized`` once it is known to be True, so training
        # steps do not read the device flag (a host-device sync per step on an accelerator);
        # forgotten whenever a state dict is loaded
        self._scaffold_known_initialized = False
        self.register_load_state_dict_post_hook(_forget_scaffold_initialized)  # type: ignore[attr-defined]

    def _scaffold_is_initialized(self) -> bool:
        """``scaffold_initialized``, read from the device only until it is first seen True."""
        if not self._scaffold_known_initialized:
            self._scaffold_known_initialized = bool(self.scaffold_initialized)
        return self._scaffold_known_initialized

    def initialize_weights(self) -> None:
        super().initialize_weights()  # type: ignore[misc]
        self._make_scaffold_params(random_frame=True)
        self.register_buffer(  # type: ignore[attr-defined]
            "scaffold_initialized",
            torch.tensor(self.cfg.scaffold_init != "pca", device=self.device),
        )
        # integer counts: ``.to(dtype)`` leaves them alone, so bf16 SAEs still count exactly
        self.register_buffer(  # type: ignore[attr-defined]
            "dense_window_counts",
            torch.zeros(self.cfg.d_sae, dtype=torch.int64, device=self.device),
        )
        self.register_buffer(  # type: ignore[attr-defined]
            "dense_window_tokens", torch.zeros((), dtype=torch.int64, device=self.device)
        )

    @torch.no_grad()
    def init_scaffold_from_batch(self, sae_in: torch.Tensor) -> None:
        """Set U = Vᵀ = the top-r principal directions of the centred batch ``sae_in`` and
        ``b_dec`` so that ``s + b_dec`` is the batch's rank-r PCA reconstruction
        ``μ + (x − μ) V Vᵀ`` (μ the batch mean): ``b_dec = μ`` when ``apply_b_dec_to_input``
        (then s is exactly the PCA reconstruction of the centred input), else
        ``b_dec = μ − μ V Vᵀ``.

        The batch is the first training batch; under SPEC §8 it holds no special tokens, and no
        other data reaches a scaffold SAE's initialisation.
        """
        x = self.run_time_activation_norm_fn_in(sae_in.to(self.dtype))  # type: ignore[attr-defined]
        x = x.reshape(-1, self.cfg.d_in)
        r = self.cfg.scaffold_rank
        if x.shape[0] < 2:
            raise ValueError(
                "scaffold_init='pca' takes the principal directions of the first training batch, "
                f"which needs at least 2 tokens; got {x.shape[0]}. Use a larger batch or "
                "scaffold_init='random'"
            )
        if x.shape[0] <= r:
            warnings.warn(
                f"PCA scaffold init from a batch of {x.shape[0]} tokens <= scaffold_rank = {r}: "
                "some of the directions are arbitrary",
                stacklevel=2,
            )
        pca = top_pca_basis(x.to(torch.float64), r)
        basis, mean = pca.basis.to(x.device), pca.mean.to(x.device)  # float64 [d_in, r], [d_in]
        self._set_scaffold_frames(basis, basis.T)
        b_dec = mean if self.cfg.apply_b_dec_to_input else mean - (mean @ basis) @ basis.T
        self.b_dec.data.copy_(b_dec.to(self.b_dec.dtype))
        self.scaffold_initialized.fill_(True)
        self._scaffold_known_initialized = True

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """``x̂ = f W_dec + s + b_dec`` (SAELens TopK decoding plus the pending scaffold)."""
        s = self._take_scaffold(feature_acts)
        if self._record_scaffold:
            self._last_scaffold = s
        sae_out_pre = (
            act_times_W_dec(feature_acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm)
            + self.b_dec
        )
        if s is not None:
            sae_out_pre = sae_out_pre + s
        sae_out_pre = self.hook_sae_recons(sae_out_pre)  # type: ignore[attr-defined]
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)  # type: ignore[attr-defined]
        return self.reshape_fn_out(sae_out_pre, self.d_head)  # type: ignore[attr-defined]

    @torch.no_grad()
    def retract_tied_scaffold(self) -> None:
        """``scaffold_tied``: re-orthonormalise V (QR, signs fixed so that R has a positive
        diagonal: a near-orthonormal V barely moves) and set U = Vᵀ. Runs after every
        optimiser step that updates V (see ``_watch_optimiser_steps``)."""
        v = self.scaffold_frames()[0].detach().to(torch.float64)
        q, rr = torch.linalg.qr(v)
        signs = torch.sign(torch.diagonal(rr))
        signs[signs == 0] = 1.0
        q = q * signs
        self._set_scaffold_frames(q, q.T)

    def _watch_optimiser_steps(self) -> None:
        """Register (once) a global ``torch.optim`` step post-hook that retracts the tied
        scaffold after every step of an optimiser holding this SAE's ``scaffold_V``.

        SAELens's ``SAETrainer`` exposes no post-step hook to the SAE; a retraction only at
        the start of ``training_forward_pass`` would leave the last step's V unretracted and
        the saved SAE untied. The hook holds the SAE weakly and is removed when it is freed.
        """
        if self in _TIED_STEP_HOOKS:
            return
        ref = weakref.ref(self)

        def post_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            sae = ref()
            if sae is None:
                return
            v = sae.scaffold_V
            if any(p is v for group in optimizer.param_groups for p in group["params"]):
                sae.retract_tied_scaffold()

        handle = register_optimizer_step_post_hook(post_step)
        _TIED_STEP_HOOKS[self] = handle  # kept off the module, so copies and pickles ignore it
        weakref.finalize(self, handle.remove)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        check_training_input(self, step_input)  # before the PCA init can see a bad batch
        if not self._scaffold_is_initialized():
            self.init_scaffold_from_batch(step_input.sae_in)
        if self.cfg.scaffold_tied:
            self._watch_optimiser_steps()
            self.retract_tied_scaffold()  # no-op after a hooked step; covers other optimisers
        self._record_scaffold = True
        try:
            output = super().training_forward_pass(step_input)  # type: ignore[misc]
            s = self._last_scaffold
        finally:
            self._record_scaffold = False
            self._last_scaffold = None
        output.metrics.update(self._scaffold_metrics(output, s, step_input.is_logging_step))
        return output

    @torch.no_grad()
    def _scaffold_metrics(
        self, output: TrainStepOutput, s: torch.Tensor | None, is_logging_step: bool
    ) -> dict[str, Callable[[], float]]:
        """The metrics as callables over this step's values (SAELens's trainer evaluates them
        only on logging steps): reading a value on the host every step would synchronise an
        accelerator every step. The window counter itself is updated on the device."""
        metrics: dict[str, Callable[[], float]] = {}
        if s is not None:
            recon, s_now = output.sae_out.detach(), s.detach()
            metrics["scaffold_variance_share"] = lambda: _variance_share(s_now, recon)
        acts = output.feature_acts.detach()
        # counting from the non-zero indices (BatchTopK codes are mostly zero) is cheaper on a
        # CPU, but ``nonzero`` synchronises an accelerator; elsewhere count with a reduction
        counts = firing_counts(acts, mostly_zero=acts.device.type == "cpu")
        n_batch = acts.shape[:-1].numel()
        self.dense_window_counts += counts.to(self.dense_window_counts)
        self.dense_window_tokens += n_batch
        window, window_tokens = self.dense_window_counts.double(), self.dense_window_tokens.clone()
        metrics["dense_latent_fraction_batch"] = lambda: dense_fraction(counts, n_batch, DENSE_THRESHOLD)
        metrics["dense_latent_fraction"] = lambda: dense_fraction(
            window, int(window_tokens), DENSE_THRESHOLD
        )
        if is_logging_step:
            self.dense_window_counts.zero_()
            self.dense_window_tokens.zero_()
        return metrics

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Restore the buffers' dtypes (SAELens's disk loader casts every tensor to the SAE
        dtype) and accept checkpoints written before the dense-window counter existed."""
        super().process_state_dict_for_loading(state_dict)  # type: ignore[misc]
        device = next(
            (v.device for v in state_dict.values() if isinstance(v, torch.Tensor)), self.device
        )
        if "scaffold_initialized" in state_dict:
            state_dict["scaffold_initialized"] = state_dict["scaffold_initialized"].to(torch.bool)
        for name, shape in (
            ("dense_window_counts", (self.cfg.d_sae,)),
            ("dense_window_tokens", ()),
        ):
            value = state_dict.get(name)
            if value is None:
                value = torch.zeros(shape, dtype=torch.int64, device=device)
            elif value.is_floating_point():
                value = value.round()
            state_dict[name] = value.to(torch.int64)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """The inference SAE stores the effective V and U (``scaffold_lr_scale`` undone, the
        tied U written out) and drops the training-only buffers."""
        super().process_state_dict_for_saving_inference(state_dict)  # type: ignore[misc]
        v, u = (t.detach() for t in self.scaffold_frames())
        state_dict["scaffold_V"] = v.clone(memory_format=torch.contiguous_format)
        state_dict["scaffold_U"] = u.clone(memory_format=torch.contiguous_format)
        for name in ("scaffold_initialized", "dense_window_counts", "dense_window_tokens"):
            state_dict.pop(name, None)

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        """Keep BatchTopK's running threshold (a float64 buffer) at least float32 under
        ``.to(torch.bfloat16)`` and other narrowing casts; device moves still apply."""
        before = self._buffers.get("topk_threshold")  # type: ignore[attr-defined]
        out = super()._apply(*args, **kwargs)  # type: ignore[misc]
        after = self._buffers.get("topk_threshold")  # type: ignore[attr-defined]
        if (
            before is not None
            and after is not None
            and after.is_floating_point()
            and torch.finfo(after.dtype).bits < 32
        ):
            self._buffers["topk_threshold"] = before.to(  # type: ignore[attr-defined]
                device=after.device, dtype=torch.promote_types(before.dtype, torch.float32)
            )
        return out


class ScaffoldBatchTopKTrainingSAE(_ScaffoldTrainingMixin, BatchTopKTrainingSAE):
    """``scaffold_batchtopk``: SAELens BatchTopK SAE trained jointly with a rank-r scaffold.

    Loss = SAELens BatchTopK's (MSE of ``x̂ = f W_dec + s + b_dec`` plus AuxK, whose residual
    ``x − x̂`` therefore already excludes the scaffold). Saved as ``scaffold_jumprelu``.
    """

    cfg: ScaffoldBatchTopKTrainingSAEConfig  # type: ignore[assignment]


class ScaffoldMatryoshkaBatchTopKTrainingSAE(
    _ScaffoldTrainingMixin, MatryoshkaBatchTopKTrainingSAE
):
    """``scaffold_matryoshka_batchtopk``: SAELens Matryoshka BatchTopK plus a rank-r scaffold.

    Every nested level's reconstruction includes the scaffold (``b_dec + s + Σ f W_dec`` over
    the level's latents), for the inner MSE losses and the Matryoshka AuxK alike. Saved as
    ``scaffold_jumprelu``.
    """

    cfg: ScaffoldMatryoshkaBatchTopKTrainingSAEConfig  # type: ignore[assignment]

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """SAELens's Matryoshka slices 2-D codes (``acts[:, a:b]``), so inputs ``[..., d_in]``
        with more leading dimensions run flattened to ``[tokens, d_in]``; the outputs get the
        input's leading dimensions back."""
        x = step_input.sae_in
        if x.dim() <= 2:
            return super().training_forward_pass(step_input)
        check_training_input(self, step_input)  # name the caller's shape in any error
        out = super().training_forward_pass(dataclasses.replace(step_input, sae_in=x.reshape(-1, x.shape[-1])))
        lead = x.shape[:-1]
        out.sae_in = x
        for name in ("sae_out", "feature_acts", "hidden_pre"):
            value = getattr(out, name)
            setattr(out, name, value.reshape(*lead, value.shape[-1]))
        return out

    @override
    def _iterable_decode(
        self, feature_acts: torch.Tensor, include_outer_loss: bool = False
    ) -> Generator[tuple[int, torch.Tensor], None, None]:
        # SAELens's levels start from b_dec; add this step's (hooked) scaffold to each. The
        # run-time output normalisation is the identity here (the config refuses the others).
        s = self._last_scaffold
        for width, partial in super()._iterable_decode(feature_acts, include_outer_loss):
            yield width, partial if s is None else partial + s


register_inference("scaffold_jumprelu", ScaffoldJumpReLUSAE, ScaffoldJumpReLUSAEConfig)
register_training(
    "scaffold_batchtopk",
    ScaffoldBatchTopKTrainingSAE,
    ScaffoldBatchTopKTrainingSAEConfig,
    inference_architecture="scaffold_jumprelu",
)
register_training(
    "scaffold_matryoshka_batchtopk",
    ScaffoldMatryoshkaBatchTopKTrainingSAE,
    ScaffoldMatryoshkaBatchTopKTrainingSAEConfig,
    inference_architecture="scaffold_jumprelu",
)
