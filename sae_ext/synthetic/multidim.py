"""Multi-dimensional ground-truth features (SPEC §6), extending ``sae_lens.synthetic``.

A multi-dimensional feature ``i`` owns a ``d_i``-dimensional subspace with orthonormal basis
``B_i ∈ R^{d_i × d_in}``. When it fires with magnitude ``m`` the activation receives
``m · u B_i`` with ``u`` uniform on the unit sphere of ``R^{d_i}``: a point on a circle for
``d_i = 2``, on a sphere for ``d_i = 3``, on ``S³`` for ``d_i = 4``. For ``d_i = 1`` the
"sphere" is ``{−1, +1}``; by default a 1-D feature is an ordinary non-negative SAELens
feature (``u = +1``, so it needs one ReLU latent), ``bipolar_1d=True`` draws the sign.

Which features fire, and with what magnitude, is decided by SAELens's own
:class:`sae_lens.synthetic.ActivationGenerator` (firing probabilities, magnitude mean/std,
correlations, hierarchy modifiers all carry over); :class:`MultiDimFeatureDictionary` plays
the role of :class:`sae_lens.synthetic.FeatureDictionary`, mapping the ``[batch, n_features]``
magnitudes to ``[batch, d_in]`` activations.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from sae_lens.synthetic import ActivationGenerator
from torch import nn


def _random_orthonormal_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """``n ≤ d`` orthonormal rows in ``R^d`` (Haar-distributed via QR with sign fix)."""
    q, r = torch.linalg.qr(torch.randn(d, n, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T.contiguous()


class MultiDimFeatureDictionary(nn.Module):
    """Per-feature subspaces: maps feature magnitudes ``[batch, n]`` to activations ``[batch, d_in]``.

    Args:
        feature_dims: ``d_i`` of every feature (each in ``[1, hidden_dim]``).
        hidden_dim: ``d_in`` of the activations.
        orthogonal: if True (default) all subspaces are mutually orthogonal, which needs
            ``Σ d_i ≤ hidden_dim``; if False each subspace is an independent random one
            (orthonormal within, overlapping across features: superposition).
        bipolar_1d: draw a random sign for 1-D features (default False: non-negative).
        seed: seed of the bases (the directions drawn per sample use ``generator`` or torch's
            global RNG, like ``ActivationGenerator``).
    """

    bases: torch.Tensor
    dims: torch.Tensor

    def __init__(
        self,
        feature_dims: Sequence[int],
        hidden_dim: int,
        orthogonal: bool = True,
        bipolar_1d: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        dims = [int(d) for d in feature_dims]
        if len(dims) == 0:
            raise ValueError("feature_dims must name at least one feature; got []")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1; got {hidden_dim}")
        bad = [d for d in dims if not 1 <= d <= hidden_dim]
        if bad:
            raise ValueError(
                f"every feature dimension must be in [1, hidden_dim={hidden_dim}]; got {bad}"
            )
        if orthogonal and sum(dims) > hidden_dim:
            raise ValueError(
                f"orthogonal subspaces need sum(feature_dims)={sum(dims)} <= hidden_dim="
                f"{hidden_dim}; use orthogonal=False for overlapping subspaces"
            )
        g = torch.Generator().manual_seed(seed)
        max_dim = max(dims)
        bases = torch.zeros(len(dims), max_dim, hidden_dim, dtype=torch.float64)
        if orthogonal:
            rows = _random_orthonormal_rows(sum(dims), hidden_dim, g)
            start = 0
            for i, d in enumerate(dims):
                bases[i, :d] = rows[start : start + d]
                start += d
        else:
            for i, d in enumerate(dims):
                bases[i, :d] = _random_orthonormal_rows(d, hidden_dim, g)
        self.register_buffer("bases", bases.to(torch.float32))
        self.register_buffer("dims", torch.tensor(dims, dtype=torch.long))
        self.hidden_dim = hidden_dim
        self.bipolar_1d = bipolar_1d

    @property
    def num_features(self) -> int:
        return int(self.dims.shape[0])

    def basis(self, feature: int) -> torch.Tensor:
        """Orthonormal basis ``(d_i, d_in)`` of feature ``feature``'s subspace."""
        if not 0 <= feature < self.num_features:
            raise ValueError(f"feature must be in [0, {self.num_features - 1}]; got {feature}")
        return self.bases[feature, : int(self.dims[feature])].clone()

    def ground_truth_bases(self) -> list[torch.Tensor]:
        """All subspace bases, one ``(d_i, d_in)`` tensor per feature."""
        return [self.basis(i) for i in range(self.num_features)]

    def sample_directions(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Unit-sphere coordinates ``u`` per (sample, feature): ``[batch, n, max_dim]`` (zero-padded)."""
        n, max_dim = self.bases.shape[:2]
        u = torch.randn(batch_size, n, max_dim, generator=generator, device=self.bases.device)
        active = torch.arange(max_dim, device=u.device) < self.dims.unsqueeze(-1)  # [n, max_dim]
        u = u * active
        one_d = self.dims == 1
        if not self.bipolar_1d:
            u[:, one_d, 0] = u[:, one_d, 0].abs()
        return u / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def coordinates(
        self, feature_magnitudes: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-feature subspace coordinates ``m · u``: ``[batch, n] -> [batch, n, max_dim]``."""
        mags = feature_magnitudes.to_dense() if feature_magnitudes.is_sparse else feature_magnitudes
        if mags.dim() != 2 or mags.shape[1] != self.num_features:
            raise ValueError(
                f"feature_magnitudes must be [batch, {self.num_features}]; got {tuple(mags.shape)}"
            )
        u = self.sample_directions(mags.shape[0], generator)
        return mags.to(u.dtype).unsqueeze(-1) * u

    def embed(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Activations from subspace coordinates: ``[batch, n, max_dim] -> [batch, d_in]``."""
        return torch.einsum("bnk,nkd->bd", coordinates, self.bases)

    def forward(
        self, feature_magnitudes: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Activations ``Σ_i m_i u_i B_i`` for magnitudes ``[batch, n]`` (zeros = not firing)."""
        return self.embed(self.coordinates(feature_magnitudes, generator))


@dataclass
class MultiDimSample:
    """A batch of multi-dimensional-feature activations with its ground truth."""

    activations: torch.Tensor
    """``[batch, d_in]``."""
    magnitudes: torch.Tensor
    """``[batch, n_features]``, zero where the feature did not fire."""
    coordinates: torch.Tensor
    """``[batch, n_features, max_dim]``: ``m · u`` in each feature's own basis."""
    bases: list[torch.Tensor]
    """Ground-truth subspace bases, ``(d_i, d_in)`` each."""


class MultiDimActivationIterator(Iterator[torch.Tensor]):
    """Endless ``[batch_size, d_in]`` activation batches for ``SAETrainer`` (like SAELens's
    ``SyntheticActivationIterator``)."""

    def __init__(
        self,
        feature_dict: MultiDimFeatureDictionary,
        activations_generator: ActivationGenerator,
        batch_size: int,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if activations_generator.num_features != feature_dict.num_features:
            raise ValueError(
                f"the activation generator has {activations_generator.num_features} features, "
                f"the dictionary {feature_dict.num_features}; they must match"
            )
        self.feature_dict = feature_dict
        self.activations_generator = activations_generator
        self.batch_size = batch_size

    @torch.no_grad()
    def sample(self, batch_size: int | None = None) -> MultiDimSample:
        """One batch with its ground truth (magnitudes, coordinates, bases)."""
        mags = self.activations_generator.sample(batch_size or self.batch_size)
        mags = mags.to_dense() if mags.is_sparse else mags
        coords = self.feature_dict.coordinates(mags)
        return MultiDimSample(
            activations=self.feature_dict.embed(coords),
            magnitudes=mags,
            coordinates=coords,
            bases=self.feature_dict.ground_truth_bases(),
        )

    def __iter__(self) -> MultiDimActivationIterator:
        return self

    def __next__(self) -> torch.Tensor:
        return self.sample().activations


def make_multidim_data(
    feature_dims: Sequence[int],
    hidden_dim: int,
    firing_probability: float | torch.Tensor = 0.05,
    mean_magnitude: float | torch.Tensor = 1.0,
    std_magnitude: float | torch.Tensor = 0.0,
    batch_size: int = 1024,
    orthogonal: bool = True,
    bipolar_1d: bool = False,
    seed: int = 0,
) -> MultiDimActivationIterator:
    """Convenience: a seeded :class:`MultiDimActivationIterator` over independent features.

    The bases depend on ``seed``; firing and directions use torch's global RNG (seed it with
    ``torch.manual_seed`` for reproducible batches, as for SAELens's generators).
    """
    feature_dict = MultiDimFeatureDictionary(
        feature_dims, hidden_dim, orthogonal=orthogonal, bipolar_1d=bipolar_1d, seed=seed
    )
    generator = ActivationGenerator(
        num_features=len(feature_dims),
        firing_probabilities=firing_probability,
        mean_firing_magnitudes=mean_magnitude,
        std_firing_magnitudes=std_magnitude,
    )
    return MultiDimActivationIterator(feature_dict, generator, batch_size)
