"""The convergence check of SPEC §8: held-out R² of a run at half its budget and at its budget.

R² is SAELens's own (``sae_lens.evals.ExplainedVarianceCalculator``, the ``explained_variance`` of
``run_evals``), on held-out activations with special-token positions already removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.evals import ExplainedVarianceCalculator

from sae_ext.capture import checkpoint_dirs, load_checkpoint
from sae_ext.protocol import CONVERGENCE_TOLERANCE, is_converged


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


@dataclass(frozen=True)
class Convergence:
    """Held-out R² at half budget and at the full budget of one run, and the verdict."""

    half_budget_tokens: int
    r2_half: float
    r2: float
    converged: bool
    tolerance: float = CONVERGENCE_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_convergence(out_dir: str | Path, x: torch.Tensor, tolerance: float = CONVERGENCE_TOLERANCE) -> Convergence:
    """The convergence record of a ``train_on_cache(..., n_checkpoints=1)`` run saved at ``out_dir``,
    measured on held-out activations ``x``."""
    ckpts = checkpoint_dirs(out_dir)
    if len(ckpts) != 1:
        raise ValueError(
            f"{out_dir} must hold exactly one mid-run checkpoint (train with n_checkpoints=1), found {len(ckpts)}"
        )
    ((tokens, ckpt),) = ckpts.items()
    r2_half = heldout_r2(load_checkpoint(ckpt), x)
    r2 = heldout_r2(SAE.load_from_disk(out_dir), x)
    return Convergence(tokens, r2_half, r2, is_converged(r2_half, r2, tolerance), tolerance)
