"""Subspace-aware sparse autoencoder (SASA), SPEC §3 — architecture name ``sasa``.

Dalili & Mahdavi (arXiv 2606.06333): a standard SAE gives every latent one decoder direction,
so a feature of intrinsic dimension ``d_i ≥ 2`` (a circle, a sphere) is split over many
near-collinear latents. SASA replaces single directions by decoder *subspaces*:

    p       = x̃ W_enc + b_enc ∈ R^{K×r}            signed codes, no ReLU
    score_k = ‖p_k‖₂;  keep the s best groups per token, zero the rest → f
    x̂       = f Ŵ_dec + b_dec                       Ŵ_dec rows unit-norm
    L       = ‖x − x̂‖² + λ_nuc · mean_k ‖D_k‖_* + AuxK(dead groups)

``d_sae = K·r`` columns form ``K`` groups of ``r`` consecutive columns; the L0 in columns is
``s·r``. The group, not the column, is the feature: splitting, firing and death are counted
per group.

**Decoder normalisation and folding.** Codes are measured in units of unit-norm decoder rows,
exactly as SAELens's TopK does with ``rescale_acts_by_decoder_norm=True``: with ``n`` the row
norms of the stored ``W_dec``, the codes are ``(x̃ W_enc + b_enc) ⊙ n`` and decoding uses
``W_dec / n``. So (i) for a unit-norm decoder this is the SPEC formula verbatim; (ii) the
function and the group selection are invariant to moving row norms between decoder and
encoder, which is what ``fold_W_dec_norm`` does (``W_dec ← W_dec/n``, ``W_enc, b_enc ← ·n``):
each group score ``‖p_k ⊙ n_k‖`` is unchanged, hence so is the Top-s selection; (iii) the
training SAE and the saved inference SAE are the same function for any weights. In training
the decoder norm enters the codes as a constant (stop-gradient) and the decoder through
``W_dec/‖W_dec‖``, so the decoder gradient is projected onto the unit sphere as in the SPEC's
"normalise in the forward"; in addition each training step starts with a function-preserving
fold that keeps the stored rows at norm 1, so Adam's step size on the directions does not
drift as row norms grow (the authors renormalise every step too). Saving for inference folds
the norms, so saved decoders have unit rows.

**Nuclear norm.** ``‖D_k‖_* = Σ sqrt(λ_i(D_k D_kᵀ))`` from the eigenvalues of the ``r×r`` Gram
matrix, computed in float64 with eigenvalues floored at ``1e-12``. Only eigenvalues (not
eigenvectors) are differentiated, so the backward ``V diag(1/(2√λ)) Vᵀ`` has no eigen-gap
terms and stays defined for repeated singular values; for ``σ_i → 0`` the gradient tends to
the polar factor ``u_i v_iᵀ`` (norm 1) and is exactly 0 below the floor (a valid subgradient).

**AuxK.** A group is dead when all its columns are dead in SAELens's ``dead_neuron_mask``.
Per token the ``k_aux`` dead groups with the largest scores reconstruct ``sg(x − x̂)`` through
their decoder blocks (no ``b_dec``), scaled by ``min(#dead/k_aux, 1)`` as in SAELens TopK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
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

from sae_ext.evaluation_spec import EvaluationSpec
from sae_ext.metrics.groups import (
    dead_groups_from_neuron_mask,
    rank90,
    stable_rank,
)
from sae_ext.registry import register_inference, register_training
from sae_ext.validation import check_sae_input, check_training_input

ARCHITECTURE = "sasa"
#: Default rank r of every group. 4 covers the intrinsic dimensions of circles/spheres
#: (d_i ≤ 4, the paper's theorem needs r ≥ d_i) and is the authors' Mistral-7B setting. At fixed
#: s·r on SmolLM2 R² and CE loss recovered fall with r (r = 1 matches TopK; r = 4 costs −0.011 R²
#: at the residual stream and −0.086 at mlp_out; benchmarks/RESULTS.md §0h): choose r = 1 when
#: fidelity matters most, r > 1 only where groups are the point.
DEFAULT_GROUP_RANK = 4
#: Default number s of active groups per token: s·r = 32 active columns. Valid for every
#: d_sae ≥ 32 (K = d_sae/4 ≥ 8), e.g. the contract width 128 (K = 32) and SAELens's CLI
#: width 1024 (K = 256); the authors use s = 10 (GPT-2) and s = 15 (Mistral-7B).
DEFAULT_N_ACTIVE_GROUPS = 8
#: Default λ_nuc (see ``SASATrainingSAEConfig``); it was 1.0 before the change logged in CHANGELOG.md
#: (sweep runs made under 1.0 keep that meaning: ``sae_ext.sweep.PRE_RESOLVED_DEFAULTS``).
DEFAULT_NUCLEAR_COEFFICIENT = 0.1
#: Floor on Gram eigenvalues (float64) in the nuclear norm: keeps sqrt differentiable.
NUCLEAR_EIGENVALUE_FLOOR = 1e-12
#: Normalisations under which the AuxK residual and the aux reconstruction live in different
#: spaces (the same restriction as SAELens TopK's aux loss).
_AUXK_INCOMPATIBLE_NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")


def _require_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}; got {value}")


def _require_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    if value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def validate_group_shape(d_sae: int, group_rank: int, n_active_groups: int) -> int:
    """Check ``d_sae = K·r`` and ``1 ≤ s ≤ K``; return the number of groups ``K``."""
    _require_int("group_rank", group_rank, 1)
    if d_sae % group_rank != 0:
        raise ValueError(
            f"d_sae={d_sae} must be a multiple of group_rank={group_rank} "
            f"(d_sae = n_groups * group_rank); allowed d_sae: multiples of {group_rank}"
        )
    n_groups = d_sae // group_rank
    _require_int("n_active_groups", n_active_groups, 1, n_groups)
    return n_groups


def split_groups(x: torch.Tensor, group_rank: int) -> torch.Tensor:
    """View ``[..., K·r]`` columns as ``[..., K, r]`` groups of ``r`` consecutive columns."""
    return rearrange(x, "... (k r) -> ... k r", r=group_rank)


def merge_groups(groups: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_groups`: ``[..., K, r] -> [..., K·r]``."""
    return rearrange(groups, "... k r -> ... (k r)")


def group_norms(codes: torch.Tensor, group_rank: int) -> torch.Tensor:
    """Group scores ``‖p_k‖₂`` of ``[..., K·r]`` codes: ``[..., K]``."""
    return split_groups(codes, group_rank).norm(dim=-1)


def keep_groups(codes: torch.Tensor, keep: torch.Tensor, group_rank: int) -> torch.Tensor:
    """Zero the groups where the boolean ``keep`` ``[..., K]`` is False; kept codes keep their
    gradient, the mask carries none."""
    groups = split_groups(codes, group_rank)
    return merge_groups(groups * keep.unsqueeze(-1).to(groups.dtype))


def top_groups_mask(scores: torch.Tensor, n_active_groups: int) -> torch.Tensor:
    """Boolean ``[..., K]`` mask of the ``n_active_groups`` highest scores of every token."""
    with torch.no_grad():
        idx = scores.detach().topk(n_active_groups, dim=-1, sorted=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def select_top_groups(codes: torch.Tensor, group_rank: int, n_active_groups: int) -> torch.Tensor:
    """Keep, per token, the ``n_active_groups`` groups with the largest L2 norm; zero the rest.

    ``codes`` is ``[..., K·r]``; the result has the same shape. The selection itself carries
    no gradient; the kept codes pass theirs through unchanged.
    """
    scores = group_norms(codes.detach(), group_rank)
    return keep_groups(codes, top_groups_mask(scores, n_active_groups), group_rank)


def group_nuclear_norms(blocks: torch.Tensor) -> torch.Tensor:
    """Differentiable nuclear norm of each block ``(K, r, d) -> (K,)`` via its ``r×r`` Gram matrix.

    Computed in float64 (outside any autocast) and returned in ``blocks.dtype``; see the module
    docstring for why the gradient is well defined at repeated or vanishing singular values.
    """
    if blocks.dim() != 3:
        raise ValueError(f"blocks must be (K, r, d); got shape {tuple(blocks.shape)}")
    with torch.autocast(device_type=blocks.device.type, enabled=False):
        b = blocks.to(torch.float64)
        eigenvalues = torch.linalg.eigvalsh(b @ b.transpose(-1, -2))
        nuclear = eigenvalues.clamp(min=NUCLEAR_EIGENVALUE_FLOOR).sqrt().sum(-1)
    return nuclear.to(blocks.dtype)


class _SASAGroupMixin:
    """Forward pass and group-level API shared by the inference and training SASA classes."""

    cfg: Any
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    hook_sae_acts_pre: Any
    hook_sae_acts_post: Any
    hook_sae_recons: Any
    d_head: Any
    run_time_activation_norm_fn_out: Any
    reshape_fn_out: Any

    @property
    def n_groups(self) -> int:
        """Number of groups ``K = d_sae / group_rank``."""
        return self.cfg.d_sae // self.cfg.group_rank

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """SAELens's input processing after the width (and opt-in NaN/Inf) check of ``sae_in``."""
        check_sae_input(self, sae_in)
        return super().process_sae_in(sae_in)  # type: ignore[misc]

    def _decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=-1).clamp(min=1e-8)

    def _code_scale(self) -> torch.Tensor:
        """Row norms that turn encoder outputs into codes in unit-decoder units."""
        return self._decoder_norms()

    def decoder_directions(self) -> torch.Tensor:
        """The ``(d_sae, d_in)`` matrix that ``decode`` multiplies codes with (unit rows by default)."""
        if self.cfg.rescale_acts_by_decoder_norm:
            return self.W_dec / self._decoder_norms().unsqueeze(-1)
        return self.W_dec

    def _codes_from_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self._code_scale()
        return hidden_pre

    def _group_keep(self, codes: torch.Tensor) -> torch.Tensor:
        """Which groups of ``[..., K·r]`` codes are kept: a boolean ``[..., K]`` mask (no gradient).

        SASA keeps the ``s`` best groups of every token; subclasses change only this rule.
        """
        return top_groups_mask(
            group_norms(codes.detach(), self.cfg.group_rank), self.cfg.n_active_groups
        )

    def _select(self, codes: torch.Tensor) -> torch.Tensor:
        return keep_groups(codes, self._group_keep(codes), self.cfg.group_rank)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``f Ŵ_dec + b_dec`` (then the usual SAELens hooks and de-normalisation)."""
        sae_out_pre = feature_acts @ self.decoder_directions() + self.b_dec
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    # ---- group-level API -------------------------------------------------------------

    @torch.no_grad()
    def group_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Signed codes of every group before selection: ``[..., d_in] -> [..., K, r]``."""
        codes = self._codes_from_sae_in(self.process_sae_in(x))
        return split_groups(codes, self.cfg.group_rank)

    @torch.no_grad()
    def group_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Group scores ``‖p_k‖₂`` used for the Top-s selection: ``[..., d_in] -> [..., K]``."""
        return self.group_codes(x).norm(dim=-1)

    @torch.no_grad()
    def active_group_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Which groups ``encode`` keeps for each token: boolean ``[..., d_in] -> [..., K]``."""
        return self._group_keep(self._codes_from_sae_in(self.process_sae_in(x)))

    @torch.no_grad()
    def active_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Indices of the ``s`` selected groups per token, best first: ``[..., d_in] -> [..., s]``."""
        return self.group_scores(x).topk(self.cfg.n_active_groups, dim=-1, sorted=True).indices

    def group_acts(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """View ``[..., d_sae]`` feature activations as ``[..., K, r]`` group codes."""
        return split_groups(feature_acts, self.cfg.group_rank)

    @torch.no_grad()
    def evaluation_spec(self) -> EvaluationSpec:
        """``evaluate_sae`` reports group firing and the ranks of the blocks ``decode`` uses."""
        return EvaluationSpec(
            group_rank=self.cfg.group_rank, group_blocks=self.group_decoder_blocks().detach().cpu()
        )

    def group_decoder_blocks(self) -> torch.Tensor:
        """All decoder blocks as used by ``decode``: ``(K, r, d_in)`` (unit rows by default)."""
        return rearrange(self.decoder_directions(), "(k r) d -> k r d", r=self.cfg.group_rank)

    def group_decoder_block(self, group: int) -> torch.Tensor:
        """Decoder block ``D_k`` of one group: ``(r, d_in)``."""
        _require_int("group", group, 0, self.n_groups - 1)
        return self.group_decoder_blocks()[group]

    @torch.no_grad()
    def group_stable_rank(self) -> torch.Tensor:
        """Stable rank ``‖D_k‖_F² / σ_max²`` ∈ [1, r] of every group's block: ``(K,)`` float64."""
        return stable_rank(self.group_decoder_blocks())

    @torch.no_grad()
    def group_rank90(self) -> torch.Tensor:
        """Singular values needed for 90 % of ``Σσ²`` of every group's block: ``(K,)`` long."""
        return rank90(self.group_decoder_blocks())

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold decoder row norms into the encoder; the group selection is unchanged because
        codes are measured in units of unit-norm decoder rows."""
        if not self.cfg.rescale_acts_by_decoder_norm:  # type: ignore[attr-defined]
            raise NotImplementedError(
                "fold_W_dec_norm would change the SASA group selection when "
                "rescale_acts_by_decoder_norm is False (after fold_activation_whitening)"
            )
        super().fold_W_dec_norm()  # type: ignore[misc]

    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        # Unwhitening changes the decoder geometry; folding the norms first makes the codes
        # (hence the selection) independent of the decoder, as SAELens TopK does.
        if self.cfg.rescale_acts_by_decoder_norm:  # type: ignore[attr-defined]
            self.fold_W_dec_norm()
            self.cfg.rescale_acts_by_decoder_norm = False  # type: ignore[attr-defined]
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)  # type: ignore[misc]


def _fold_norms_into_encoder(state: dict[str, torch.Tensor], norms: torch.Tensor) -> None:
    """Function-preserving fold on a state dict: ``W_dec/n``, ``W_enc·n``, ``b_enc·n`` (new tensors)."""
    state["W_dec"] = state["W_dec"] / norms.unsqueeze(1)
    state["W_enc"] = state["W_enc"] * norms.unsqueeze(0)
    state["b_enc"] = state["b_enc"] * norms


@dataclass
class SASASAEConfig(SAEConfig):
    """Inference config of a SASA SAE.

    Args:
        group_rank: r, columns per group (``d_sae`` must be a multiple). Default 4.
        n_active_groups: s, groups kept per token (``1 ≤ s ≤ d_sae / r``). Default 8.
        rescale_acts_by_decoder_norm: measure codes in units of unit-norm decoder rows (SPEC;
            makes ``fold_W_dec_norm`` exact). Turned off only by ``fold_activation_whitening``.
    """

    group_rank: int = DEFAULT_GROUP_RANK
    n_active_groups: int = DEFAULT_N_ACTIVE_GROUPS
    rescale_acts_by_decoder_norm: bool = True

    def __post_init__(self) -> None:
        validate_group_shape(self.d_sae, self.group_rank, self.n_active_groups)
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @property
    def n_groups(self) -> int:
        return self.d_sae // self.group_rank


class SASASAE(_SASAGroupMixin, SAE[SASASAEConfig]):
    """Inference SASA SAE: signed group codes, per-token Top-s groups, subspace decoder."""

    b_enc: nn.Parameter

    def __init__(self, cfg: SASASAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    @override
    def get_activation_fn(self) -> Any:
        return nn.Identity()  # unused: codes are signed and selected per group

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Signed codes of the ``s`` best groups per token (others zero): ``[..., d_sae]``."""
        codes = self._codes_from_sae_in(self.process_sae_in(x))
        return self.hook_sae_acts_post(self._select(codes))

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return _SASAGroupMixin.decode(self, feature_acts)


@dataclass
class SASATrainingSAEConfig(TrainingSAEConfig):
    """Training config of a SASA SAE (SPEC §3).

    Args:
        group_rank: r, columns per group; ``d_sae`` must be a multiple. Default 4 (covers
            circle/sphere features, ``d_i ≤ 4``; the authors' Mistral-7B setting).
        n_active_groups: s, groups kept per token, ``1 ≤ s ≤ d_sae / r``. Default 8 (L0 = 32
            columns; valid for every ``d_sae ≥ 32``).
        nuclear_coefficient: λ_nuc on ``mean_k ‖D_k‖_*``. It competes with the summed squared
            error, so choose it relative to ``E‖x‖²``: about 0.005–0.01·E‖x‖² made the groups
            adapt their rank on our synthetic benchmark, and the authors' λ = 100 on raw GPT-2-small
            residuals (‖x‖² ~ 10⁴) is of the same order. Default 0.1 (≈ 0.0002·d_in for inputs
            normalised to ``E‖x‖² = d_in`` with ``"expected_average_only_in"``). On SmolLM2 (8 M
            tokens) it converged where the former default 1.0 collapsed the used groups towards
            rank 1 and the run degraded with training: r = 4 at ``blocks.15.hook_attn_out`` and
            r = 8 at ``hook_mlp_out`` (benchmarks/RESULTS.md §0h). At r = 8 at ``hook_attn_out``
            it collapses them too, and λ_nuc 0 does not converge there either: avoid r = 8 at that
            hook. At 0.1 the term barely lowers the groups' rank on real activations; raise it
            for rank adaptation, and watch the sweep's ``mean_live_group_stable_rank``: lower
            λ_nuc if it falls towards 1.
        nuclear_warm_up_steps: linear warm-up of λ_nuc from 0 (SAELens coefficient scheduler).
        aux_k_coefficient: weight of the AuxK loss over dead groups (SAELens TopK: 1.0).
        aux_k_groups: dead groups used per token by AuxK; ``None`` → ``max(1, d_in // (2r))``,
            i.e. about ``d_in/2`` columns as in SAELens TopK.
        rescale_acts_by_decoder_norm: codes in unit-decoder units (the SPEC's unit-norm
            decoder). Only ``fold_activation_whitening`` turns it off.
    """

    group_rank: int = DEFAULT_GROUP_RANK
    n_active_groups: int = DEFAULT_N_ACTIVE_GROUPS
    nuclear_coefficient: float = DEFAULT_NUCLEAR_COEFFICIENT
    nuclear_warm_up_steps: int = 0
    aux_k_coefficient: float = 1.0
    aux_k_groups: int | None = None
    rescale_acts_by_decoder_norm: bool = True

    def __post_init__(self) -> None:
        n_groups = validate_group_shape(self.d_sae, self.group_rank, self.n_active_groups)
        _require_non_negative("nuclear_coefficient", self.nuclear_coefficient)
        _require_int("nuclear_warm_up_steps", self.nuclear_warm_up_steps, 0)
        _require_non_negative("aux_k_coefficient", self.aux_k_coefficient)
        if self.aux_k_groups is not None:
            _require_int("aux_k_groups", self.aux_k_groups, 1, n_groups)
        if (
            self.aux_k_coefficient > 0
            and self.normalize_activations in _AUXK_INCOMPATIBLE_NORMALIZATIONS
        ):
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported with "
                f"aux_k_coefficient={self.aux_k_coefficient} > 0 (the AuxK residual and its "
                "reconstruction would live in different spaces); allowed: 'none', "
                "'expected_average_only_in', 'covariance_whitening', or aux_k_coefficient=0"
            )
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @property
    def n_groups(self) -> int:
        return self.d_sae // self.group_rank

    @property
    def effective_aux_k_groups(self) -> int:
        """Dead groups per token used by AuxK (resolves the ``None`` default)."""
        if self.aux_k_groups is not None:
            return self.aux_k_groups
        return max(1, self.d_in // (2 * self.group_rank))


class SASATrainingSAE(_SASAGroupMixin, TrainingSAE[SASATrainingSAEConfig]):
    """Training SASA SAE: MSE + λ_nuc · mean nuclear norm of decoder blocks + group AuxK."""

    b_enc: nn.Parameter

    def __init__(self, cfg: SASATrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        # SAELens's init (decoder rows of norm decoder_init_norm, W_enc = W_decᵀ), then the
        # function-preserving fold so the stored decoder starts with unit rows.
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        if self.cfg.rescale_acts_by_decoder_norm:
            self.fold_and_get_W_dec_norm()

    @override
    def get_activation_fn(self) -> Any:
        return nn.Identity()  # unused: codes are signed and selected per group

    @override
    def _code_scale(self) -> torch.Tensor:
        # A constant in training: the decoder's gradient flows only through W_dec/‖W_dec‖.
        return self._decoder_norms().detach()

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (selected signed codes, all codes before selection), both ``[..., d_sae]``."""
        codes = self._codes_from_sae_in(self.process_sae_in(x))
        return self.hook_sae_acts_post(self._select(codes)), codes

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return _SASAGroupMixin.decode(self, feature_acts)

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "nuclear": TrainCoefficientConfig(
                value=self.cfg.nuclear_coefficient,
                warm_up_steps=self.cfg.nuclear_warm_up_steps,
            )
        }

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One SASA step; renormalises the stored decoder first (a function-preserving fold)."""
        check_training_input(self, step_input)  # before the fold changes anything
        if self.cfg.rescale_acts_by_decoder_norm:
            self.fold_and_get_W_dec_norm()
        output = super().training_forward_pass(step_input)
        output.metrics.update(self._group_metrics(output, step_input.dead_neuron_mask))
        return output

    def _group_metrics(
        self, output: TrainStepOutput, dead_neuron_mask: torch.Tensor | None
    ) -> dict[str, Any]:
        """Lazily evaluated group metrics (SAELens's trainer calls them only on logging steps)."""
        r = self.cfg.group_rank
        metrics: dict[str, Any] = {
            "mean_group_stable_rank": lambda: self.group_stable_rank().mean(),
            "mean_group_rank90": lambda: self.group_rank90().double().mean(),
            "active_groups_per_token": lambda: (
                split_groups(output.feature_acts.detach() != 0, r).any(-1).sum(-1).double().mean()
            ),
        }
        if dead_neuron_mask is not None:
            dead = dead_groups_from_neuron_mask(dead_neuron_mask, r)
            metrics["dead_groups_fraction"] = lambda: dead.double().mean()
        return metrics

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        coefficient = step_input.coefficients.get("nuclear", self.cfg.nuclear_coefficient)
        if coefficient > 0:
            nuclear = coefficient * group_nuclear_norms(self.group_decoder_blocks()).mean()
        else:
            nuclear = sae_out.new_zeros(())
        auxk = self.calculate_group_aux_loss(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            hidden_pre=hidden_pre,
            dead_neuron_mask=step_input.dead_neuron_mask,
        )
        return {"nuclear_loss": nuclear, "auxiliary_reconstruction_loss": auxk}

    def calculate_group_aux_loss(
        self,
        sae_in: torch.Tensor,
        sae_out: torch.Tensor,
        hidden_pre: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """AuxK over dead groups: the top-k_aux dead groups per token reconstruct ``sg(x − x̂)``."""
        if self.cfg.aux_k_coefficient == 0 or dead_neuron_mask is None:
            return sae_out.new_zeros(())
        dead_groups = dead_groups_from_neuron_mask(
            dead_neuron_mask.to(hidden_pre.device), self.cfg.group_rank
        )
        num_dead = int(dead_groups.sum())
        if num_dead == 0:
            return sae_out.new_zeros(())
        k_aux = self.cfg.effective_aux_k_groups
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)

        residual = (sae_in - sae_out).detach()
        scores = group_norms(hidden_pre.detach(), self.cfg.group_rank).masked_fill(
            ~dead_groups, -torch.inf
        )
        aux_acts = keep_groups(hidden_pre, top_groups_mask(scores, k_aux), self.cfg.group_rank)
        recons = self.reshape_fn_out(aux_acts @ self.decoder_directions(), self.d_head)
        loss = (recons - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_k_coefficient * scale * loss

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        if self.cfg.rescale_acts_by_decoder_norm:
            _fold_norms_into_encoder(state_dict, self.get_W_dec_norm())

    @override
    @torch.no_grad()
    def log_histograms(self) -> dict[str, NDArray[Any]]:
        hist = super().log_histograms()
        hist["weights/group_stable_rank"] = self.group_stable_rank().float().cpu().numpy()
        hist["weights/group_rank90"] = self.group_rank90().float().cpu().numpy()
        return hist


register_inference(ARCHITECTURE, SASASAE, SASASAEConfig)
register_training(ARCHITECTURE, SASATrainingSAE, SASATrainingSAEConfig)
