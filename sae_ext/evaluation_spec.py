"""What an architecture adds to the generic evaluation, asked of the SAE class itself.

An SAE class may define ``evaluation_spec(self) -> EvaluationSpec``: the scaffolded SAEs name
their ``hook_scaffold`` (zeroed and compared with removing the top-r PCA directions, its range
set against those directions by principal angles), SASA names
its groups (group firing statistics and decoder-block ranks). SAEs without the method are
evaluated generically. :mod:`sae_ext.evaluate` and :mod:`sae_ext.metrics.dictionary` read
nothing else architecture-specific.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["EvaluationSpec", "HasEvaluationSpec", "evaluation_spec"]


@dataclass(frozen=True)
class EvaluationSpec:
    """Architecture-specific parts of :func:`sae_ext.evaluate.evaluate_sae`."""

    ablation_hook: str | None = None
    """An SAE hook point carrying one component of the reconstruction (the scaffold): it is
    zeroed while the SAE is spliced with its error term."""
    ablation_pca_rank: int | None = None
    """Rank of the top-PCA subspace removed for comparison with zeroing ``ablation_hook``."""
    ablation_subspace: torch.Tensor | None = None
    """Orthonormal basis ``[d_in, m]`` of the span ``ablation_hook`` writes into (the scaffold's
    range), for its principal angles to the removed top-PCA directions."""
    group_rank: int | None = None
    """Latents per group (consecutive columns), for group firing statistics."""
    group_blocks: torch.Tensor | None = None
    """Decoder blocks ``(K, r, d_in)`` as ``decode`` uses them, for group stable rank / rank90."""

    def __post_init__(self) -> None:
        for name in ("ablation_pca_rank", "group_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")
        q = self.ablation_subspace
        if q is not None and (self.ablation_hook is None or q.ndim != 2 or q.shape[1] < 1
                              or not bool(q.isfinite().all())):
            raise ValueError(
                f"ablation_subspace must be a finite [d_in, m] basis with ablation_hook set, got shape "
                f"{tuple(q.shape)} and ablation_hook {self.ablation_hook!r}"
            )
        b = self.group_blocks
        if b is not None and (self.group_rank is None or b.ndim != 3 or b.shape[1] != self.group_rank):
            raise ValueError(
                f"group_blocks must be (K, group_rank, d_in) with group_rank set, got shape "
                f"{tuple(b.shape)} and group_rank {self.group_rank}"
            )


@runtime_checkable
class HasEvaluationSpec(Protocol):
    """An SAE class that tells the evaluation what its architecture adds."""

    def evaluation_spec(self) -> EvaluationSpec: ...


def evaluation_spec(sae: Any) -> EvaluationSpec:
    """The SAE's own :class:`EvaluationSpec`, or the generic (empty) one."""
    if isinstance(sae, HasEvaluationSpec):
        spec = sae.evaluation_spec()
        if not isinstance(spec, EvaluationSpec):
            raise ValueError(
                f"{type(sae).__name__}.evaluation_spec() returned {type(spec).__name__}, "
                "expected an EvaluationSpec"
            )
        return spec
    return EvaluationSpec()
