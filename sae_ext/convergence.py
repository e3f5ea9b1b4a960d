"""The convergence check of SPEC §8: held-out R² of a run and of its half-budget twin.

Protocol runs decay their learning rate (:func:`sae_ext.protocol.lr_schedule`), so a mid-run
checkpoint is not the SAE a shorter run gives; :func:`train_with_half_budget` trains the run of
half the budget (same settings, its own schedule and dead window) beside the run itself. R² is
SAELens's own (``sae_lens.evals.ExplainedVarianceCalculator``, the ``explained_variance`` of
``run_evals``), on held-out activations with special-token positions already removed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, TrainingSAE, TrainingSAEConfig
from sae_lens.constants import SAE_WEIGHTS_FILENAME
from sae_lens.evals import ExplainedVarianceCalculator

from sae_ext.capture import PROTOCOL_FILE, ActivationCache, train_on_cache
from sae_ext.protocol import CONVERGENCE_TOLERANCE, is_converged

#: Where :func:`train_with_half_budget` puts the half-budget run, inside the run's folder.
HALF_BUDGET_DIR = "half_budget"


@torch.no_grad()
def heldout_r2(sae: SAE[Any], x: torch.Tensor, batch_size: int = 4096) -> float:
    """Explained variance of ``sae`` on the activations ``x`` ``[n, d_in]``."""
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] != sae.cfg.d_in:
        raise ValueError(f"x must be [n >= 2, d_in={sae.cfg.d_in}] activations, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or Inf")
    calc = ExplainedVarianceCalculator()
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(sae.device, sae.dtype)
        calc.add_batch(sae(xb), xb)
    return calc.compute()


def train_with_half_budget(
    sae_cfg: TrainingSAEConfig,
    cache: ActivationCache,
    model: Any,
    out_dir: str | Path,
    *,
    training_tokens: int,
    half_budget_from: str | Path | None = None,
    **train_kwargs: Any,
) -> TrainingSAE:
    """Train the run of ``training_tokens`` into ``out_dir`` and its half-budget twin into
    ``out_dir/half_budget`` (:func:`sae_ext.capture.train_on_cache` with the same arguments);
    :func:`run_convergence` then compares them. Returns the full run's SAE.

    ``half_budget_from``: a saved run of exactly this setting at ``training_tokens // 2`` (the
    caller vouches for the setting; the budget is checked), copied as the twin instead of trained,
    so doubling a budget costs only the new run (training is deterministic per seed)."""
    if isinstance(training_tokens, bool) or not isinstance(training_tokens, int) or training_tokens < 2:
        raise ValueError(f"training_tokens must be an int >= 2, got {training_tokens!r}")
    out = Path(out_dir)
    if half_budget_from is not None:
        src = Path(half_budget_from)
        try:
            tokens = json.loads((src / PROTOCOL_FILE).read_text())["training_tokens"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            raise ValueError(f"half_budget_from={str(src)!r} holds no saved protocol run ({PROTOCOL_FILE})") from None
        if tokens != training_tokens // 2:
            raise ValueError(f"half_budget_from={str(src)!r} must be a saved run of {training_tokens // 2} "
                             f"tokens (half of {training_tokens}); it has {tokens}")
        if not (src / SAE_WEIGHTS_FILENAME).is_file():
            raise ValueError(f"half_budget_from={str(src)!r} has no saved SAE ({SAE_WEIGHTS_FILENAME})")
        half = out / HALF_BUDGET_DIR
        half.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, half / f.name)
    else:
        train_on_cache(sae_cfg, cache, model, None, out / HALF_BUDGET_DIR, training_tokens=training_tokens // 2,
                       **train_kwargs)
    return train_on_cache(sae_cfg, cache, model, None, out, training_tokens=training_tokens, **train_kwargs)


@dataclass(frozen=True)
class Convergence:
    """Held-out R² of a run and of its half-budget twin, and the verdict."""

    half_budget_tokens: int
    r2_half: float
    r2: float
    converged: bool
    tolerance: float = CONVERGENCE_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_convergence(
    out_dir: str | Path, x: torch.Tensor, tolerance: float = CONVERGENCE_TOLERANCE, device: str = "cpu"
) -> Convergence:
    """The convergence record of a :func:`train_with_half_budget` run saved at ``out_dir``,
    measured on held-out activations ``x`` (both SAEs loaded onto ``device``)."""
    half = Path(out_dir) / HALF_BUDGET_DIR
    if not (half / SAE_WEIGHTS_FILENAME).is_file():
        raise ValueError(f"{out_dir} holds no half-budget run ({half}); train it with train_with_half_budget")
    tokens = json.loads((half / PROTOCOL_FILE).read_text())["training_tokens"]
    r2_half = heldout_r2(SAE.load_from_disk(half, device=device), x)
    r2 = heldout_r2(SAE.load_from_disk(out_dir, device=device), x)
    return Convergence(tokens, r2_half, r2, is_converged(r2_half, r2, tolerance), tolerance)
