"""SAE dark matter (SPEC §4; Engels, Riggs & Tegmark, arXiv 2410.14670).

For activations ``x`` and an SAE, the error is ``e = x - SAE(x)``. A linear map ``W*`` is
fitted by least squares ``x W ≈ e`` on a train split and scored on a disjoint test split:

* **error R²** – ``1 - SS_res/SS_tot`` per output dimension of ``e``, averaged over dimensions;
* **norm R²** – the same for the scalar regression of ``‖e‖²`` on ``x``;
* **FVU** – ``Σ‖x - x̂‖² / Σ‖x - x̄‖²``; **nonlinear FVU** – the FVU of ``SAE(x) + x W*``;
* ``x W*`` is the *linear error*, ``e - x W*`` the *nonlinear error*.

Memory: every quantity above is a quadratic form of ``[x, 1]`` and ``e``, so one pass over the
data accumulates, per split, ``XᵀX``, ``XᵀE``, ``Xᵀ‖e‖²`` and a few sums in float64, and the
test scores are evaluated from the test split's statistics once ``W*`` is known. Nothing of
size ``n_tokens × d_in`` is kept, a one-shot iterator of batches is enough (one SAE forward
per token), and the cost is ``O(d_in²)`` memory (four ``(d_in+1)²`` float64 matrices).

The split is drawn per token from a seeded PCG64 stream in data order, so it does not depend
on how the data is batched: a tensor and the same rows fed as batches give the same split,
and :func:`holdout_mask` reproduces it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_ext.sae_io import (
    check_activations,
    encode_decode,
    iter_activation_batches,
    n_batches_hint,
)

__all__ = [
    "DarkMatterAccumulator",
    "DarkMatterResult",
    "NormPredictability",
    "dark_matter",
    "dark_matter_from_reconstructions",
    "error_norm_predictability",
    "linear_error",
    "nonlinear_error",
    "sae_error_norms",
    "holdout_mask",
]

#: default ridge, relative to the mean diagonal of the (uncentred) train Gram matrix ``XᵀX``.
DEFAULT_RIDGE = 1e-6


def _stats_device(x: torch.Tensor) -> torch.device:
    # float64 is unavailable on MPS
    return torch.device("cpu") if x.device.type == "mps" else x.device


# --------------------------------------------------------------------------------------------
# linear / nonlinear error
# --------------------------------------------------------------------------------------------


def _augment(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    if W.ndim != 2 or W.shape[1] != d or W.shape[0] not in (d, d + 1):
        raise ValueError(
            f"W has shape {tuple(W.shape)}; for activations of width {d} it must be "
            f"[{d}, {d}] (no intercept) or [{d + 1}, {d}] (with intercept)"
        )
    if W.shape[0] == d + 1:
        return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
    return x


def linear_error(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The linearly predictable part of the SAE error, ``x W*`` (``[x, 1] W*`` with intercept).

    ``W`` is :attr:`DarkMatterResult.W`; the product is taken in ``W``'s dtype and returned in
    ``x``'s dtype and device.
    """
    W = W.to(x.device)
    xa = _augment(x, W)
    return (xa.to(W.dtype) @ W).to(x.dtype)


def nonlinear_error(x: torch.Tensor, sae_out: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The part of the SAE error ``e = x - sae_out`` that ``x W*`` does not predict."""
    if sae_out.shape != x.shape:
        raise ValueError(
            f"sae_out has shape {tuple(sae_out.shape)} but x has shape {tuple(x.shape)}; "
            "they must match"
        )
    return (x - sae_out) - linear_error(x, W)


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------


def _check_fraction(test_fraction: float) -> None:
    if not (isinstance(test_fraction, (int, float)) and 0.0 < float(test_fraction) < 1.0):
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")


def holdout_mask(n_tokens: int, test_fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Boolean mask (True = test) over the first ``n_tokens`` tokens, in data order.

    This is exactly the split :func:`dark_matter` uses for the same ``test_fraction``/``seed``.
    """
    _check_fraction(test_fraction)
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.random(n_tokens) < test_fraction)


# --------------------------------------------------------------------------------------------
# accumulation
# --------------------------------------------------------------------------------------------


class _SplitStats:
    """Sufficient statistics of one split (float64): ``[x,1]ᵀ[x,1]``, ``[x,1]ᵀe``, ..."""

    def __init__(self, d: int, device: torch.device) -> None:
        f64 = torch.float64
        self.xx = torch.zeros(d + 1, d + 1, dtype=f64, device=device)
        self.xe = torch.zeros(d + 1, d, dtype=f64, device=device)
        self.xn = torch.zeros(d + 1, dtype=f64, device=device)  # Σ [x,1] ‖e‖²
        self.ee = torch.zeros(d, dtype=f64, device=device)  # Σ e² per dim
        self.e_sum = torch.zeros(d, dtype=f64, device=device)
        self.nn = torch.zeros((), dtype=f64, device=device)  # Σ ‖e‖⁴
        self.n_sum = torch.zeros((), dtype=f64, device=device)  # Σ ‖e‖²

    def add(self, x: torch.Tensor, e: torch.Tensor) -> None:
        xa = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        nrm = (e * e).sum(dim=1)
        self.xx += xa.T @ xa
        self.xe += xa.T @ e
        self.xn += xa.T @ nrm
        self.ee += (e * e).sum(dim=0)
        self.e_sum += e.sum(dim=0)
        self.nn += (nrm * nrm).sum()
        self.n_sum += nrm.sum()

    @property
    def count(self) -> int:
        return int(round(self.xx[-1, -1].item()))


@dataclass
class DarkMatterResult:
    """Dark-matter scores on the test split and the map fitted on the train split."""

    error_r2: float
    """Mean over error dimensions of the test R² of ``x W* ≈ e`` (dims with zero test variance skipped)."""
    norm_r2: float
    """Test R² of the linear regression of ``‖e‖²`` on ``x``."""
    fvu: float
    """``Σ‖x - SAE(x)‖² / Σ‖x - x̄‖²`` on the test split."""
    nonlinear_fvu: float
    """FVU of ``SAE(x) + x W*``, i.e. of the nonlinear error alone."""
    linear_error_norm_share: float
    """``Σ‖x W*‖² / (Σ‖x W*‖² + Σ‖e - x W*‖²)`` on the test split: the share of squared
    error norm carried by the linear component."""
    W: torch.Tensor
    """Fitted map, float64 ``[d_in, d_in]`` (``[d_in + 1, d_in]`` with intercept, bias last)."""
    per_dim_r2: torch.Tensor
    """Test R² per error dimension, float64 ``[d_in]`` (NaN where the test variance is 0)."""
    norm_coef: torch.Tensor
    """Coefficients of the ``‖e‖²`` regression, float64 ``[d_in(+1)]``."""
    fit_intercept: bool
    n_train: int
    n_test: int
    ridge: float
    """Absolute ridge added to the diagonal of ``XᵀX`` (not to the intercept)."""
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | int | bool]:
        """JSON-safe scalar summary (no tensors)."""
        return {
            "error_r2": self.error_r2,
            "norm_r2": self.norm_r2,
            "fvu": self.fvu,
            "nonlinear_fvu": self.nonlinear_fvu,
            "linear_error_norm_share": self.linear_error_norm_share,
            "fit_intercept": self.fit_intercept,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "ridge": self.ridge,
            **self.extra,
        }


def _solve(a: torch.Tensor, b: torch.Tensor, ridge_abs: float, d: int) -> torch.Tensor:
    """Solve ``(A + λ diag(1..1, 0)) W = B``; the intercept row/column (index ``d``) is unpenalised."""
    reg = a.clone()
    idx = torch.arange(min(d, a.shape[0]), device=a.device)
    reg[idx, idx] += ridge_abs
    try:
        return torch.linalg.solve(reg, b)
    except RuntimeError:  # singular even with the ridge (e.g. all-zero inputs)
        return torch.linalg.pinv(reg) @ b


def _r2(ss_res: torch.Tensor, ss_tot: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """``1 - SS_res/SS_tot``; NaN where the total variance is zero up to float64 round-off
    (relative to the uncentred sum of squares ``sum_sq`` it was computed from)."""
    valid = ss_tot > 1e-12 * sum_sq.abs().clamp_min(torch.finfo(torch.float64).tiny)
    out = 1.0 - ss_res / torch.where(valid, ss_tot, torch.ones_like(ss_tot))
    return torch.where(valid, out, torch.full_like(out, float("nan")))


#: below this many train tokens per regression parameter, the fitted map overfits (warned)
MIN_TRAIN_PER_PARAMETER = 4


class DarkMatterAccumulator:
    """One-pass accumulator of the dark-matter statistics; feed it ``(x, SAE(x))`` batches.

    ``update`` assigns every incoming token to train or test (see :func:`holdout_mask`);
    ``result`` fits ``W*`` on the train statistics and scores it on the test statistics.
    """

    def __init__(self, d_in: int, *, test_fraction: float = 0.5, seed: int = 0) -> None:
        _check_fraction(test_fraction)
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        self.d_in = d_in
        self.test_fraction = float(test_fraction)
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._train: _SplitStats | None = None
        self._test: _SplitStats | None = None

    def update(self, x: torch.Tensor, sae_out: torch.Tensor) -> None:
        """Add a batch of activations ``x`` ``[n, d_in]`` and reconstructions ``SAE(x)``."""
        if x.ndim != 2 or x.shape[1] != self.d_in or sae_out.shape != x.shape:
            raise ValueError(
                f"expected x and sae_out of shape [n, {self.d_in}], got {tuple(x.shape)} "
                f"and {tuple(sae_out.shape)}"
            )
        device = _stats_device(x)
        if self._train is None:
            self._train = _SplitStats(self.d_in, device)
            self._test = _SplitStats(self.d_in, device)
        assert self._test is not None
        is_test = torch.from_numpy(self._rng.random(x.shape[0]) < self.test_fraction)
        is_test = is_test.to(device)
        x64 = x.to(device=device, dtype=torch.float64)
        e64 = x64 - sae_out.to(device=device, dtype=torch.float64)
        if bool(is_test.any()):
            self._test.add(x64[is_test], e64[is_test])
        if not bool(is_test.all()):
            self._train.add(x64[~is_test], e64[~is_test])

    @property
    def n_tokens(self) -> int:
        """Tokens seen so far (train + test)."""
        return sum(s.count for s in (self._train, self._test) if s is not None)

    def mean_error(self) -> torch.Tensor:
        """Mean SAE error ``E[x − SAE(x)]`` over every token seen (float32 ``[d_in]``, CPU)."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were seen")
        total = sum(s.e_sum for s in (self._train, self._test) if s is not None)
        return (total / self.n_tokens).float().cpu()

    def result(
        self, *, fit_intercept: bool = False, ridge: float = DEFAULT_RIDGE
    ) -> DarkMatterResult:
        """Fit on train, score on test. ``ridge`` is relative to the mean diagonal of ``XᵀX``."""
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        d = self.d_in
        n_train = 0 if self._train is None else self._train.count
        n_test = 0 if self._test is None else self._test.count
        if n_train < 1 or n_test < 2:
            raise ValueError(
                f"need at least 1 train and 2 test tokens, got {n_train} train and {n_test} test "
                "tokens; pass more activations or change test_fraction"
            )
        assert self._train is not None and self._test is not None
        tr, te = self._train, self._test
        p = d + 1 if fit_intercept else d
        if n_train < MIN_TRAIN_PER_PARAMETER * p:
            warnings.warn(
                f"dark matter: {n_train} train tokens for a {p}-parameter-per-output least-squares "
                f"fit (fewer than {MIN_TRAIN_PER_PARAMETER}×{p}); W* will overfit and the test-split "
                "R² can be negative — pass more activations",
                UserWarning,
                stacklevel=2,
            )
        a = tr.xx[:p, :p]
        mean_diag = float(torch.diagonal(tr.xx)[:d].mean().item())
        ridge_abs = ridge * mean_diag if mean_diag > 0 else ridge
        W = _solve(a, tr.xe[:p], ridge_abs, d)
        w_norm = _solve(a, tr.xn[:p].unsqueeze(1), ridge_abs, d).squeeze(1)

        # ---- score on the test statistics --------------------------------------------------
        n = float(n_test)
        at, bt = te.xx[:p, :p], te.xe[:p]
        aw = at @ W
        lin_sq_per_dim = (aw * W).sum(dim=0)  # Σ (xW)² per dim
        ss_res = (te.ee - 2.0 * (W * bt).sum(dim=0) + lin_sq_per_dim).clamp_min(0.0)
        ss_tot = te.ee - te.e_sum**2 / n
        per_dim = _r2(ss_res, ss_tot, te.ee)
        valid = ~torch.isnan(per_dim)
        error_r2 = float(per_dim[valid].mean().item()) if bool(valid.any()) else float("nan")

        norm_res = (te.nn - 2.0 * (w_norm * te.xn[:p]).sum() + w_norm @ at @ w_norm).clamp_min(0.0)
        norm_tot = te.nn - te.n_sum**2 / n
        norm_r2 = float(_r2(norm_res.reshape(1), norm_tot.reshape(1), te.nn.reshape(1))[0].item())

        x_sum = te.xx[d, :d]
        x_var = float((torch.diagonal(te.xx)[:d].sum() - (x_sum * x_sum).sum() / n).item())
        err_sq = float(te.ee.sum().item())
        nonlin_sq = float(ss_res.sum().item())
        lin_sq = float(lin_sq_per_dim.sum().item())
        fvu = err_sq / x_var if x_var > 0 else float("nan")
        nonlinear_fvu = nonlin_sq / x_var if x_var > 0 else float("nan")
        denom = lin_sq + nonlin_sq
        share = lin_sq / denom if denom > 0 else float("nan")
        return DarkMatterResult(
            error_r2=error_r2,
            norm_r2=norm_r2,
            fvu=fvu,
            nonlinear_fvu=nonlinear_fvu,
            linear_error_norm_share=share,
            W=W.cpu(),
            per_dim_r2=per_dim.cpu(),
            norm_coef=w_norm.cpu(),
            fit_intercept=fit_intercept,
            n_train=n_train,
            n_test=n_test,
            ridge=ridge_abs,
        )


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------


def dark_matter(
    sae: Any,
    activations: torch.Tensor | Iterable[torch.Tensor],
    *,
    test_fraction: float = 0.5,
    fit_intercept: bool = False,
    seed: int = 0,
    batch_size: int = 4096,
    ridge: float = DEFAULT_RIDGE,
    progress: bool = True,
) -> DarkMatterResult:
    """Dark-matter scores of ``sae`` on ``activations`` (SPEC §4).

    ``activations`` is a tensor ``[..., d_in]`` or an iterable (possibly one-shot) of such
    batches. Tokens are split train/test with ``test_fraction`` and ``seed``; the least-squares
    map ``x W ≈ e`` (no intercept by default, as the authors; ``fit_intercept`` adds one) is
    solved in float64 with a ridge of ``ridge × mean(diag XᵀX)`` for numerical safety, and all
    scores are computed on the test split. Works for any SAE exposing ``encode``/``decode``.
    """
    _check_fraction(test_fraction)
    d_in = int(sae.cfg.d_in)
    if isinstance(activations, torch.Tensor):
        check_activations(activations, d_in)  # before any work
    acc = DarkMatterAccumulator(d_in, test_fraction=test_fraction, seed=seed)
    batches = iter_activation_batches(activations, d_in, batch_size)
    total = n_batches_hint(activations, batch_size)
    for x in tqdm(batches, total=total, desc="dark matter", leave=False, disable=not progress):
        _, out = encode_decode(sae, x)
        acc.update(x, out)
    return acc.result(fit_intercept=fit_intercept, ridge=ridge)


def dark_matter_from_reconstructions(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    test_fraction: float = 0.5,
    fit_intercept: bool = False,
    seed: int = 0,
    ridge: float = DEFAULT_RIDGE,
) -> DarkMatterResult:
    """:func:`dark_matter` from precomputed ``(x, SAE(x))`` pairs of shape ``[n, d_in]``."""
    _check_fraction(test_fraction)
    acc: DarkMatterAccumulator | None = None
    for i, (x, out) in enumerate(pairs):
        d = x.shape[-1]
        check_activations(x, d, what=f"activations of pair {i}")
        check_activations(out, d, what=f"reconstructions of pair {i}")
        if acc is None:
            acc = DarkMatterAccumulator(d, test_fraction=test_fraction, seed=seed)
        acc.update(x.reshape(-1, d), out.reshape(-1, d))
    if acc is None:
        raise ValueError("pairs is empty: no activations to score")
    return acc.result(fit_intercept=fit_intercept, ridge=ridge)


@torch.no_grad()
def sae_error_norms(
    sae: Any,
    activations: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch_size: int = 4096,
    progress: bool = True,
) -> torch.Tensor:
    """Per-token ``‖x - SAE(x)‖`` (float32, flat, in data order) for :func:`error_norm_predictability`."""
    d_in = int(sae.cfg.d_in)
    out: list[torch.Tensor] = []
    batches = iter_activation_batches(activations, d_in, batch_size)
    total = n_batches_hint(activations, batch_size)
    for x in tqdm(batches, total=total, desc="error norms", leave=False, disable=not progress):
        _, rec = encode_decode(sae, x)
        out.append((x.float() - rec.float()).norm(dim=-1).cpu())
    if not out:
        raise ValueError("activations are empty")
    return torch.cat(out)


@dataclass
class NormPredictability:
    """OLS of ``‖e_j‖`` on ``[‖e_i‖, 1]`` over tokens (in-sample: two parameters)."""

    r2: float
    slope: float
    intercept: float
    n_tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "r2": self.r2,
            "slope": self.slope,
            "intercept": self.intercept,
            "n_tokens": self.n_tokens,
        }


def error_norm_predictability(
    errors_i_norms: torch.Tensor, errors_j_norms: torch.Tensor
) -> NormPredictability:
    """How well SAE *i*'s per-token error norm predicts SAE *j*'s (same tokens, same order).

    Engels et al. find larger SAEs mostly struggle on the same tokens as smaller ones: a high
    R² here. Regression ``‖e_j‖ ≈ a ‖e_i‖ + b`` in float64.
    """
    xi = torch.as_tensor(errors_i_norms).reshape(-1)
    yj = torch.as_tensor(errors_j_norms).reshape(-1)
    if xi.shape != yj.shape:
        raise ValueError(
            f"errors_i_norms has {xi.numel()} values but errors_j_norms has {yj.numel()}; "
            "they must be norms of the same tokens"
        )
    if xi.numel() < 3:
        raise ValueError(f"need at least 3 tokens, got {xi.numel()}")
    for name, t in (("errors_i_norms", xi), ("errors_j_norms", yj)):
        bad = int((~torch.isfinite(t)).sum().item())
        if bad:
            raise ValueError(
                f"{name} contains {bad} non-finite value(s) (NaN/Inf); only finite norms are allowed"
            )
    x = xi.double()
    y = yj.double()
    xm, ym = x.mean(), y.mean()
    sxx = ((x - xm) ** 2).sum()
    sxy = ((x - xm) * (y - ym)).sum()
    syy = ((y - ym) ** 2).sum()
    slope = float((sxy / sxx).item()) if sxx > 0 else 0.0
    intercept = float((ym - slope * xm).item())
    ss_res = ((y - (slope * x + intercept)) ** 2).sum()
    r2 = float((1 - ss_res / syy).item()) if syy > 0 else float("nan")
    return NormPredictability(r2=r2, slope=slope, intercept=intercept, n_tokens=int(x.numel()))
