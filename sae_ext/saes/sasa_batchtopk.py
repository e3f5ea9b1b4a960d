"""SASA with batch-level group selection, SPEC §3 — ``sasa_batchtopk`` (training) and
``sasa_jumprelu`` (inference).

Plain SASA (:mod:`sae_ext.saes.sasa`) keeps exactly ``s`` groups on every token, so a token
that carries more than ``s`` features must drop some. As SAELens's ``batchtopk`` does for
single latents, ``sasa_batchtopk`` keeps the ``s·B`` highest group scores ``‖p_k‖₂`` over a
batch of ``B`` tokens (every leading dimension counts as tokens): ``s`` groups a token on
average, more where a token needs them, fewer where it does not.

**Threshold.** The batch selection needs a batch; a single token at inference does not have
one. Exactly as SAELens's ``BatchTopKTrainingSAE``, every training step moves a running
threshold towards the smallest kept score, ``θ ← (1 − lr)·θ + lr · min_{kept} ‖p_k‖``
(``topk_threshold_lr``, float64 buffer ``topk_threshold``), and saving for inference turns it
into a per-group threshold of a ``sasa_jumprelu`` SAE that keeps every group with
``‖p_k‖ > θ_k`` (SAELens turns BatchTopK into JumpReLU the same way). The inference threshold
is float32 (float64 for a float64 SAE) whatever the SAE dtype, ``.to(dtype)`` included, and
scores are compared in that precision; SAELens's disk loader casts saved tensors to the config
dtype first, so a bf16 SAE loaded from disk compares against bf16-rounded values.

**Everything else is SASA's**: the same codes (in units of unit-norm decoder rows), decoder,
per-step decoder renormalisation, nuclear term, group AuxK, group-level API, folds and
:meth:`evaluation_spec` — the classes below subclass the SASA ones and change only the rule
that picks the kept groups (``_group_keep``). Scores are in unit-decoder units, so
``fold_W_dec_norm`` leaves them and θ unchanged; ``fold_activation_norm_scaling_factor``
divides the scores by the factor, hence θ too (SAELens's BatchTopK does the same).

The training SAE's ``encode`` selects over the batch it is given (as SAELens's BatchTopK);
the saved ``sasa_jumprelu`` SAE is the per-token function used at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from torch import nn
from typing_extensions import override

from sae_ext.activations import keep_thresholds_at_least_float32
from sae_ext.registry import register_inference, register_training
from sae_ext.saes.sasa import (
    SASASAE,
    SASASAEConfig,
    SASATrainingSAE,
    SASATrainingSAEConfig,
    group_norms,
)

TRAINING_ARCHITECTURE = "sasa_batchtopk"
INFERENCE_ARCHITECTURE = "sasa_jumprelu"
#: SAELens BatchTopK's default step of the running threshold.
DEFAULT_TOPK_THRESHOLD_LR = 0.01


def batch_top_groups_mask(scores: torch.Tensor, n_active_groups: int) -> torch.Tensor:
    """Boolean ``[..., K]`` mask of the ``s·B`` highest scores over all ``B`` tokens of ``scores``.

    Every leading dimension counts as tokens, so ``[batch, seq, K]`` and its flattening
    ``[batch·seq, K]`` select the same groups. No gradient flows through the mask.
    """
    with torch.no_grad():
        flat = scores.detach().flatten()
        n_keep = min(n_active_groups * scores.shape[:-1].numel(), flat.numel())
        idx = flat.topk(n_keep, sorted=False).indices
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True)
        return keep.view(scores.shape)


def _threshold_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for a float64 SAE."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class SASAJumpReLUSAEConfig(SASASAEConfig):
    """Inference config of a batch-selected SASA SAE (``sasa_jumprelu``).

    Args:
        group_rank: r, columns per group. Default 4.
        n_active_groups: s, the mean number of groups per token the threshold was trained
            for (informational: inference keeps every group whose score exceeds its θ).
        rescale_acts_by_decoder_norm: codes in units of unit-norm decoder rows (as ``sasa``).
    """

    @override
    @classmethod
    def architecture(cls) -> str:
        return INFERENCE_ARCHITECTURE


class SASAJumpReLUSAE(SASASAE):
    """Inference SASA SAE that keeps every group with ``‖p_k‖₂ > θ_k`` (per-group threshold)."""

    cfg: SASAJumpReLUSAEConfig  # type: ignore[assignment]
    threshold: nn.Parameter

    def __init__(self, cfg: SASAJumpReLUSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.threshold = nn.Parameter(
            torch.zeros(self.n_groups, dtype=_threshold_dtype(self.dtype), device=self.device)
        )

    @override
    def _group_keep(self, codes: torch.Tensor) -> torch.Tensor:
        scores = group_norms(codes.detach().to(self.threshold.dtype), self.cfg.group_rank)
        return scores > self.threshold

    @override
    def active_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Not defined here: the number of kept groups varies per token; use
        :meth:`active_group_mask`."""
        raise NotImplementedError(
            f"{INFERENCE_ARCHITECTURE} keeps a varying number of groups per token; "
            "use active_group_mask(x) (boolean [..., K]) instead of active_groups(x)"
        )

    @override
    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        """Keep θ at least float32 when the SAE is cast to bf16/fp16 (device moves apply)."""
        with keep_thresholds_at_least_float32(self, ("threshold",)):
            return super()._apply(*args, **kwargs)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            self.threshold.data /= scaling_factor  # scores are divided by the factor


@dataclass
class SASABatchTopKTrainingSAEConfig(SASATrainingSAEConfig):
    """Training config of SASA with batch-level group selection (SPEC §3, ``sasa_batchtopk``).

    All SASA fields (``group_rank``, ``n_active_groups`` — now the *mean* groups per token —,
    ``nuclear_coefficient``, ``nuclear_warm_up_steps``, ``aux_k_coefficient``,
    ``aux_k_groups``, ``rescale_acts_by_decoder_norm``), plus

    Args:
        topk_threshold_lr: step of the running score threshold θ towards the smallest kept
            score, in ``(0, 1]`` (SAELens BatchTopK's ``topk_threshold_lr``). Default 0.01.
    """

    topk_threshold_lr: float = DEFAULT_TOPK_THRESHOLD_LR

    def __post_init__(self) -> None:
        lr = self.topk_threshold_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 1:
            raise ValueError(f"topk_threshold_lr must be a number in (0, 1]; got {lr!r}")
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return TRAINING_ARCHITECTURE

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return SASAJumpReLUSAEConfig


class SASABatchTopKTrainingSAE(SASATrainingSAE):
    """Training SASA SAE keeping the ``s·B`` best groups of a batch; learns θ for inference."""

    cfg: SASABatchTopKTrainingSAEConfig  # type: ignore[assignment]
    topk_threshold: torch.Tensor

    def __init__(self, cfg: SASABatchTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.register_buffer(
            "topk_threshold", torch.tensor(0.0, dtype=torch.float64, device=self.W_dec.device)
        )

    @override
    def _group_keep(self, codes: torch.Tensor) -> torch.Tensor:
        scores = group_norms(codes.detach(), self.cfg.group_rank)
        return batch_top_groups_mask(scores, self.cfg.n_active_groups)

    @override
    def active_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Not defined here: the number of kept groups varies per token; use
        :meth:`active_group_mask`."""
        raise NotImplementedError(
            f"{TRAINING_ARCHITECTURE} keeps a varying number of groups per token; "
            "use active_group_mask(x) (boolean [..., K]) instead of active_groups(x)"
        )

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """A SASA step with batch selection, then the running-threshold update."""
        output = super().training_forward_pass(step_input)
        self.update_topk_threshold(output.feature_acts)
        output.metrics["topk_threshold"] = self.topk_threshold
        return output

    @torch.no_grad()
    def update_topk_threshold(self, feature_acts: torch.Tensor) -> None:
        """``θ ← (1 − lr)·θ + lr · min`` score of the kept (non-zero) groups in ``feature_acts``."""
        with torch.autocast(self.topk_threshold.device.type, enabled=False):
            scores = group_norms(feature_acts.detach().to(torch.float64), self.cfg.group_rank)
            smallest = scores.masked_fill(scores <= 0, torch.inf).min()
            lr = self.cfg.topk_threshold_lr
            moved = (1 - lr) * self.topk_threshold + lr * smallest
            # no kept group (all codes zero): θ stays; no host sync, no data-dependent shape
            self.topk_threshold = torch.where(smallest.isfinite(), moved, self.topk_threshold)

    @override
    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        """Keep the running threshold float64 (as SAELens creates it) under every dtype cast;
        device moves still apply."""
        before = self._buffers.get("topk_threshold")
        out = super()._apply(*args, **kwargs)
        after = self._buffers.get("topk_threshold")
        if before is not None and after is not None and after.dtype != torch.float64:
            self._buffers["topk_threshold"] = before.to(device=after.device, dtype=torch.float64)
        return out

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            self.topk_threshold /= scaling_factor  # scores are divided by the factor

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Restore the running threshold's float64 (SAELens's disk loader casts every saved
        tensor to the config dtype first, so it holds that dtype's rounding of θ)."""
        super().process_state_dict_for_loading(state_dict)
        if "topk_threshold" in state_dict:
            state_dict["topk_threshold"] = state_dict["topk_threshold"].to(torch.float64)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """SASA's (decoder norms folded into the encoder), then θ → per-group JumpReLU thresholds."""
        super().process_state_dict_for_saving_inference(state_dict)
        theta = state_dict.pop("topk_threshold")
        state_dict["threshold"] = torch.full(
            (self.n_groups,),
            float(theta),
            dtype=_threshold_dtype(self.dtype),
            device=theta.device,
        )


register_inference(INFERENCE_ARCHITECTURE, SASAJumpReLUSAE, SASAJumpReLUSAEConfig)
register_training(
    TRAINING_ARCHITECTURE,
    SASABatchTopKTrainingSAE,
    SASABatchTopKTrainingSAEConfig,
    inference_architecture=INFERENCE_ARCHITECTURE,
)
