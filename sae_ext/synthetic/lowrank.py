"""Sparse features plus a dense low-rank component, with ground truth (SPEC §6).

    x = f F + b + z (σ ⊙ Bᵀ)        f ~ SAELens ActivationGenerator   [n, n_features]
                                   F: SAELens FeatureDictionary rows  [n_features, d_in]
                                   z ~ N(0, I_r),  B: orthonormal     [d_in, r]

What real residual streams have and the scaffold must cope with (SPEC §2 v2), each optional
and off by default so existing callers draw exactly what they drew before:

- a mean offset: ``b`` (``bias``, its norm), the same for every token;
- an anisotropic dense part: ``dense_std`` as r numbers (e.g. :func:`geometric_spectrum`);
- a rare outlier token (``outlier_prob``): the whole row replaced by one fixed vector of norm
  ``outlier_norm`` — what BOS is at SmolLM2's residual stream (‖x‖ ≈ 25,000 vs ≈ 171, the same
  vector in every row). ``SparsePlusLowRankSample.outlier_mask`` marks those rows, so a
  pipeline can keep them out of training and statistics as SPEC §8 does with special tokens.

The dense part ``z (σ ⊙ Bᵀ)`` lives in the r-dimensional subspace spanned by the columns of
``B`` (``dense_basis``, the ground truth a scaffold should find) and, with ``σ`` large, carries
most of the variance: every token has it, so a sparse dictionary can only represent it with
latents that fire on a large fraction of tokens — the dense latents the scaffolded-SAE paper
(Deng et al., arXiv 2606.14040) attributes to such a "computational scaffold".

The sparse part reuses ``sae_lens.synthetic`` (``FeatureDictionary`` with its orthogonalising
initializer, ``ActivationGenerator``, ``zipfian_firing_probabilities``). Sampling is
reproducible from ``seed`` and leaves the global torch RNG as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    orthogonal_initializer,
    zipfian_firing_probabilities,
)

#: Default firing probabilities are Zipfian in [MIN, MAX]; MAX < 0.1 so no ground-truth sparse
#: feature is itself "dense" by the SAEBench 10 % rule.
DEFAULT_MAX_FIRING_PROB = 0.08
DEFAULT_MIN_FIRING_PROB = 0.005


@dataclass
class SparsePlusLowRankSample:
    """One draw of activations and its decomposition (all float32 on CPU)."""

    activations: torch.Tensor  # [n, d_in]  sparse_part + dense_part
    sparse_part: torch.Tensor  # [n, d_in]  f F + b
    dense_part: torch.Tensor  # [n, d_in]  z (σ ⊙ Bᵀ)
    feature_acts: torch.Tensor  # [n, n_features]  ground-truth sparse codes f
    dense_codes: torch.Tensor  # [n, r]  z ~ N(0, I_r)
    dense_basis: torch.Tensor  # [d_in, r]  ground-truth dense subspace B (orthonormal columns)
    feature_directions: torch.Tensor  # [n_features, d_in]  ground-truth sparse directions F
    #: [n] bool: rows replaced by the outlier vector (all False without outliers); on those rows
    #: ``activations`` is the outlier vector and the other parts / codes are zero
    outlier_mask: torch.Tensor | None = None


def geometric_spectrum(first: float, last: float, r: int) -> list[float]:
    """``r`` standard deviations decaying geometrically from ``first`` to ``last`` (> 0): an
    anisotropic dense part, like the top of a real activation spectrum."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer >= 1; got {r!r}")
    for name, v in (("first", first), ("last", last)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0; got {v!r}")
    if r == 1:
        return [float(first)]
    ratio = (last / first) ** (1 / (r - 1))
    return [float(first * ratio**i) for i in range(r)]


def _as_std(dense_std: float | Sequence[float], r: int) -> torch.Tensor:
    std = torch.as_tensor(dense_std, dtype=torch.float32).flatten()
    if std.numel() == 1:
        std = std.expand(r).clone()
    if std.numel() != r:
        raise ValueError(
            f"dense_std must be a number or a sequence of dense_rank = {r} numbers; got {std.numel()} values"
        )
    if not torch.isfinite(std).all() or (std < 0).any():
        raise ValueError(f"dense_std must be finite and >= 0; got {std.tolist()}")
    return std


class SparsePlusLowRank:
    """Generator of sparse-plus-dense-low-rank activations with known ground truth.

    Args:
        d_in: activation width (>= 2).
        n_features: number of ground-truth sparse features (>= 1).
        dense_rank: rank r of the dense component, 1 <= r < d_in.
        dense_std: standard deviation σ of the dense component along each of its r
            directions (a number, or r numbers for a decaying spectrum); >= 0.
        firing_probabilities: per-feature firing probability (a number or ``[n_features]``
            in (0, 1]); default Zipfian (exponent 0.5) between 0.005 and 0.08.
        mean_magnitude / std_magnitude: firing magnitude distribution (SAELens's).
        orthogonal_to_dense: project the sparse directions off the dense subspace (and
            renormalise) so the two parts are geometrically separable; default False
            (random overlap, about r / d_in of each direction's energy).
        bias: norm of a constant offset added to every activation (SAELens's
            ``FeatureDictionary`` bias; 0 = none).
        orthogonalize: spread the sparse directions apart with SAELens's
            ``orthogonal_initializer`` (default; a few seconds for thousands of features)
            instead of leaving them as independent random unit vectors.
        outlier_prob: probability that a token is the outlier token, in [0, 1) (default 0:
            none; drawn after everything else, so the other draws do not change).
        outlier_norm: norm of the outlier vector (> 0; default 100), a fixed random direction.
        seed: seeds the ground truth (dictionary, dense basis) and, by default, the stream.
        stream_seed: seeds the sampling stream only (default ``seed``): generators with the
            same ``seed`` and different ``stream_seed`` share the ground truth but draw
            different samples (e.g. a held-out set).
    """

    def __init__(
        self,
        d_in: int,
        n_features: int,
        dense_rank: int,
        dense_std: float | Sequence[float] = 3.0,
        firing_probabilities: float | torch.Tensor | None = None,
        mean_magnitude: float = 1.0,
        std_magnitude: float = 0.25,
        orthogonal_to_dense: bool = False,
        bias: float = 0.0,
        orthogonalize: bool = True,
        seed: int = 0,
        stream_seed: int | None = None,
        outlier_prob: float = 0.0,
        outlier_norm: float = 100.0,
    ) -> None:
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 2:
            raise ValueError(f"d_in must be an integer >= 2; got {d_in!r}")
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"n_features must be an integer >= 1; got {n_features!r}")
        if (
            isinstance(dense_rank, bool)
            or not isinstance(dense_rank, int)
            or not 1 <= dense_rank < d_in
        ):
            raise ValueError(
                f"dense_rank must be an integer with 1 <= dense_rank < d_in "
                f"(allowed: 1..{d_in - 1}); got {dense_rank!r}"
            )
        self.dense_std = _as_std(dense_std, dense_rank)
        if firing_probabilities is None:
            probs = zipfian_firing_probabilities(
                n_features,
                exponent=0.5,
                max_prob=DEFAULT_MAX_FIRING_PROB,
                min_prob=DEFAULT_MIN_FIRING_PROB,
            ) if n_features > 1 else torch.tensor([DEFAULT_MAX_FIRING_PROB])
        else:
            probs = torch.as_tensor(firing_probabilities, dtype=torch.float32).flatten()
            if probs.numel() == 1:
                probs = probs.expand(n_features).clone()
        if probs.numel() != n_features or not ((probs > 0) & (probs <= 1)).all():
            raise ValueError(
                f"firing_probabilities must be one number or {n_features} numbers in (0, 1]; "
                f"got {probs.numel()} values in [{probs.min().item()}, {probs.max().item()}]"
            )
        if not (math.isfinite(mean_magnitude) and mean_magnitude > 0):
            raise ValueError(f"mean_magnitude must be finite and > 0; got {mean_magnitude!r}")
        if not (math.isfinite(std_magnitude) and std_magnitude >= 0):
            raise ValueError(f"std_magnitude must be finite and >= 0; got {std_magnitude!r}")
        if not (math.isfinite(bias) and bias >= 0):
            raise ValueError(f"bias must be a finite norm >= 0; got {bias!r}")
        if isinstance(outlier_prob, bool) or not (
            isinstance(outlier_prob, (int, float)) and 0 <= outlier_prob < 1
        ):
            raise ValueError(f"outlier_prob must be a number in [0, 1); got {outlier_prob!r}")
        if isinstance(outlier_norm, bool) or not (
            isinstance(outlier_norm, (int, float)) and math.isfinite(outlier_norm) and outlier_norm > 0
        ):
            raise ValueError(f"outlier_norm must be a finite number > 0; got {outlier_norm!r}")
        self.outlier_prob = float(outlier_prob)

        self.d_in, self.n_features, self.dense_rank, self.seed = d_in, n_features, dense_rank, seed
        self.stream_seed = seed if stream_seed is None else stream_seed
        g = torch.Generator().manual_seed(seed)
        q, rr = torch.linalg.qr(torch.randn(d_in, dense_rank, generator=g, dtype=torch.float64))
        signs = torch.sign(torch.diagonal(rr))
        signs[signs == 0] = 1.0
        #: ground-truth dense subspace, [d_in, r] with orthonormal columns
        self.dense_basis = (q * signs).float()
        # its own generator, so the ground truth above and below does not change with it
        o = torch.randn(d_in, generator=torch.Generator().manual_seed(seed + 3))
        #: the outlier token's activation, [d_in], norm ``outlier_norm``
        self.outlier_vector = o / o.norm() * float(outlier_norm)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.feature_dict = FeatureDictionary(
                n_features,
                d_in,
                bias=bias if bias > 0 else False,
                initializer=orthogonal_initializer() if orthogonalize else None,
                seed=seed + 2,
            )
        self.feature_dict.eval()
        if orthogonal_to_dense:
            with torch.no_grad():
                f = self.feature_dict.feature_vectors
                f -= (f @ self.dense_basis) @ self.dense_basis.T
                f /= f.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        self.activation_generator = ActivationGenerator(
            n_features,
            firing_probabilities=probs,
            std_firing_magnitudes=std_magnitude,
            mean_firing_magnitudes=mean_magnitude,
        )
        self._draws = 0

    @property
    def feature_directions(self) -> torch.Tensor:
        """Ground-truth sparse feature directions, ``[n_features, d_in]`` unit rows."""
        return self.feature_dict.feature_vectors.detach()

    @property
    def firing_probabilities(self) -> torch.Tensor:
        """Per-feature firing probability, ``[n_features]``."""
        return self.activation_generator.firing_probabilities

    def dense_variance(self) -> float:
        """Expected total variance of the dense part, ``Σ σ_i²``."""
        return float(self.dense_std.pow(2).sum())

    @torch.no_grad()
    def sample(self, n: int) -> SparsePlusLowRankSample:
        """Draw ``n`` activations with their decomposition; successive calls continue the stream."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1; got {n!r}")
        draw = self._draws
        self._draws += 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.stream_seed * 1_000_003 + 7919 * (draw + 1))
            feature_acts = self.activation_generator.sample(n)
            z = torch.randn(n, self.dense_rank)
            outliers = (
                torch.rand(n) < self.outlier_prob
                if self.outlier_prob > 0
                else torch.zeros(n, dtype=torch.bool)
            )
        sparse = self.feature_dict(feature_acts)
        dense = (z * self.dense_std) @ self.dense_basis.T
        acts = sparse + dense
        if outliers.any():
            keep = (~outliers).float()[:, None]
            sparse, dense, feature_acts, z = sparse * keep, dense * keep, feature_acts * keep, z * keep
            acts = torch.where(outliers[:, None], self.outlier_vector, acts)
        return SparsePlusLowRankSample(
            activations=acts,
            sparse_part=sparse,
            dense_part=dense,
            feature_acts=feature_acts,
            dense_codes=z,
            dense_basis=self.dense_basis,
            feature_directions=self.feature_directions,
            outlier_mask=outliers,
        )

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Endless stream of activation batches ``[batch_size, d_in]`` (an SAELens data provider)."""
        while True:
            yield self.sample(batch_size).activations


def sparse_plus_lowrank(n: int, **kwargs: object) -> SparsePlusLowRankSample:
    """One-shot: ``SparsePlusLowRank(**kwargs).sample(n)`` (activations plus ground truth)."""
    return SparsePlusLowRank(**kwargs).sample(n)  # type: ignore[arg-type]
