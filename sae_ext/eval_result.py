"""The typed result of :func:`sae_ext.evaluate.evaluate_sae` and its JSON form (``eval.json``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sae_ext.interventions import DarkMatterCE, DirectionRemoval, ErrorNodeAblation, HookAblation
from sae_ext.metrics.dark_matter import DarkMatterResult
from sae_ext.metrics.dictionary import DictionaryStats
from sae_ext.saelens_evals import RunEvalsMetrics

__all__ = ["ComponentAblation", "EvaluationResult", "SAEInfo", "json_safe"]


def json_safe(obj: Any) -> Any:
    """Plain JSON types; NaN/Inf become ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    return str(obj)


@dataclass
class SAEInfo:
    """Which SAE was evaluated where."""

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    """The canonical hook the SAE was spliced at."""
    requested_hook_name: str
    model: str


@dataclass
class ComponentAblation:
    """Zeroing an SAE-internal component (the scaffold) vs removing the top-r PCA directions."""

    ablation: HookAblation
    pca_removal: DirectionRemoval | None
    pca_rank: int | None
    pca_explained_variance: float | None
    """Share of the activation variance in the removed PCA directions."""
    increase_ratio_vs_pca: float | None
    """``ΔCE(component zeroed) / ΔCE(PCA removed)``."""
    principal_angles_deg: list[float] | None = None
    """Principal angles (degrees, ascending) between the component's range and the removed
    top-r PCA directions; ``None`` when the SAE declares no subspace or no PCA was removed."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ablation": self.ablation.to_dict(),
            "pca_removal": self.pca_removal.to_dict() if self.pca_removal is not None else None,
            "pca_rank": self.pca_rank,
            "pca_explained_variance": self.pca_explained_variance,
            "increase_ratio_scaffold_vs_pca": self.increase_ratio_vs_pca,
            "principal_angles_deg_vs_pca": self.principal_angles_deg,
        }


@dataclass
class EvaluationResult:
    """Everything :func:`~sae_ext.evaluate.evaluate_sae` measured; ``to_dict`` is ``eval.json``."""

    sae: SAEInfo
    n_tokens: int
    n_sequences: int
    context_size: int
    n_special_positions: int
    """Positions holding a special token: never spliced, never counted (SPEC §8)."""
    run_evals: RunEvalsMetrics
    dark_matter: DarkMatterResult
    dictionary: DictionaryStats
    dark_matter_ce: DarkMatterCE | None = None
    error_node_ablation: dict[str, ErrorNodeAblation] | None = None
    scaffold: ComponentAblation | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN/Inf as ``None``), the layout of ``eval.json``."""
        err = self.error_node_ablation
        return json_safe(
            {
                "sae": asdict(self.sae),
                "n_tokens": self.n_tokens,
                "n_sequences": self.n_sequences,
                "context_size": self.context_size,
                "n_special_positions": self.n_special_positions,
                "run_evals": self.run_evals.to_dict(),
                "dark_matter": self.dark_matter.to_dict(),
                "dark_matter_ce": self.dark_matter_ce.to_dict() if self.dark_matter_ce else None,
                "dictionary": self.dictionary.to_dict(),
                "error_node_ablation": {k: v.to_dict() for k, v in err.items()} if err else None,
                "scaffold": self.scaffold.to_dict() if self.scaffold else None,
            }
        )
