"""Antipodal (bipolar) ground-truth features (SPEC §6), built on ``sae_lens.synthetic``.

Each feature ``j`` has a unit direction ``d_j``. It fires with probability ``p_j``
(SAELens's :class:`~sae_lens.synthetic.ActivationGenerator`), with a positive magnitude
``a ~ ReLU(N(mean_j, std_j²))`` as in SAELens, and then takes one sign: ``+a`` with
probability ``q_j``, otherwise ``−a`` — never both at once. The activation is
``x = Σ_j c_j d_j (+ bias)`` with signed coefficients ``c`` (SAELens's
:class:`~sae_lens.synthetic.FeatureDictionary`). A non-negative SAE needs two latents
(``+d_j`` and ``−d_j``) per bipolar feature; a sign-aware SAE can use one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    FiringProbabilityConfig,
    MagnitudeConfig,
    generate_magnitudes,
    orthogonal_initializer,
)
from sae_lens.util import cosine_similarities, temporary_seed
from torch import nn

__all__ = ["BipolarFeatureModel", "BipolarSample", "latents_per_feature"]


@dataclass
class BipolarSample:
    """A batch of synthetic activations with its ground truth."""

    activations: torch.Tensor
    """(batch, hidden_dim) dense activations ``coefficients @ directions + bias``."""
    coefficients: torch.Tensor
    """(batch, num_features) signed feature coefficients (0 where a feature is off)."""


def _per_feature(
    value: float | torch.Tensor | MagnitudeConfig | FiringProbabilityConfig,
    num_features: int,
    seed: int | None,
) -> torch.Tensor:
    if isinstance(value, FiringProbabilityConfig):
        return value.generate(num_features, seed=seed)
    if isinstance(value, torch.Tensor):
        return value.float()
    return generate_magnitudes(num_features, value, seed=seed)


class BipolarFeatureModel(nn.Module):
    """Synthetic activations from antipodal features, with directions and signed coefficients.

    Args:
        num_features: number of ground-truth features F.
        hidden_dim: activation dimension d.
        firing_probability: per-feature p (float, (F,) tensor or a SAELens
            ``FiringProbabilityConfig``).
        mean_magnitude / std_magnitude: per-feature magnitude mean and std when firing
            (float, (F,) tensor or a SAELens ``MagnitudeConfig``).
        positive_probability: q, probability that a firing of a bipolar feature is positive.
        bipolar_share: share of features that are bipolar (a random subset, fixed by
            ``seed``); the others always fire positive (q = 1).
        orthogonalize: make the directions as orthogonal as possible (SAELens's
            ``orthogonal_initializer``); otherwise random unit vectors.
        bias: passed to ``FeatureDictionary`` (False, True or a bias norm).
        seed: fixes the directions, the bipolar subset and the sample stream; None uses
            the global RNG for sampling.
    """

    def __init__(
        self,
        num_features: int,
        hidden_dim: int,
        firing_probability: float | torch.Tensor | FiringProbabilityConfig = 0.01,
        mean_magnitude: float | torch.Tensor | MagnitudeConfig = 1.0,
        std_magnitude: float | torch.Tensor | MagnitudeConfig = 0.0,
        positive_probability: float = 0.5,
        bipolar_share: float = 1.0,
        orthogonalize: bool = True,
        bias: bool | float = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if not 0 < positive_probability < 1:
            raise ValueError(
                f"positive_probability must be in (0, 1) for bipolar features, got {positive_probability}"
            )
        if not 0 <= bipolar_share <= 1:
            raise ValueError(f"bipolar_share must be in [0, 1], got {bipolar_share}")
        self.feature_dict = FeatureDictionary(
            num_features,
            hidden_dim,
            bias=bias,
            initializer=orthogonal_initializer() if orthogonalize else None,
            seed=seed,
        )
        with temporary_seed(seed):
            self.activation_generator = ActivationGenerator(
                num_features,
                firing_probabilities=_per_feature(firing_probability, num_features, seed),
                std_firing_magnitudes=_per_feature(std_magnitude, num_features, seed),
                mean_firing_magnitudes=_per_feature(mean_magnitude, num_features, seed),
            )
            n_bipolar = round(bipolar_share * num_features)
            is_bipolar = torch.zeros(num_features, dtype=torch.bool)
            is_bipolar[torch.randperm(num_features)[:n_bipolar]] = True
        self.register_buffer("is_bipolar", is_bipolar)
        self.register_buffer(
            "positive_probability",
            torch.where(is_bipolar, positive_probability, 1.0).float(),
        )
        self._rng = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def directions(self) -> torch.Tensor:
        """(F, d) unit ground-truth directions."""
        return self.feature_dict.feature_vectors.detach()

    @property
    def num_features(self) -> int:
        return self.feature_dict.num_features

    @torch.no_grad()
    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> BipolarSample:
        """Draw ``batch_size`` activations and their signed coefficients.

        ``generator`` drives this draw (default: the model's own stream, or the global RNG
        when the model has no seed); the global RNG state is left untouched either way.
        """
        rng = generator if generator is not None else self._rng
        seed = None if rng is None else int(torch.randint(0, 2**62, (1,), generator=rng))
        with temporary_seed(seed):
            magnitudes = self.activation_generator.sample(batch_size)
            positive = torch.rand(magnitudes.shape) < self.positive_probability
        coefficients = torch.where(positive, magnitudes, -magnitudes)
        return BipolarSample(self.feature_dict(coefficients), coefficients)

    def batches(self, batch_size: int, seed: int | None = None) -> Iterator[torch.Tensor]:
        """An endless stream of activation batches (a data provider for ``SAETrainer``).

        ``seed`` gives the stream its own generator, so several streams over the same
        ground truth can be drawn independently and reproducibly.
        """
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, generator).activations


@torch.no_grad()
def latents_per_feature(
    W_dec: torch.Tensor, directions: torch.Tensor, min_abs_cos: float = 0.9
) -> torch.Tensor:
    """For each ground-truth direction, how many decoder rows lie along it (|cos| ≥ min_abs_cos).

    A sign-aware SAE should use 1 latent per bipolar feature; a non-negative SAE needs 2
    (one per sign, pointing at ``+d`` and ``−d``). This is SPEC §6's splitting count for
    one-dimensional features, with signs counted (``|cos|``).
    """
    cos = cosine_similarities(W_dec.float(), directions.float()).abs()
    return (cos >= min_abs_cos).sum(dim=0)
