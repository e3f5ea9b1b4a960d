"""The bipolar (antipodal) synthetic feature generator."""

from __future__ import annotations

import pytest
import torch
from sae_lens.synthetic import LinearMagnitudeConfig, ZipfianFiringProbabilityConfig

from sae_ext.metrics.sign import positive_share, sign_counts
from sae_ext.synthetic.bipolar import BipolarFeatureModel, latents_per_feature


def test_activations_are_signed_coefficients_times_unit_directions() -> None:
    model = BipolarFeatureModel(24, 16, firing_probability=0.2, bias=0.5, seed=3)
    sample = model.sample(256)
    assert sample.activations.shape == (256, 16)
    assert sample.coefficients.shape == (256, 24)
    torch.testing.assert_close(model.directions.norm(dim=-1), torch.ones(24))
    expected = sample.coefficients @ model.directions + model.feature_dict.bias
    torch.testing.assert_close(sample.activations, expected)


def test_firing_rate_sign_split_and_positive_magnitudes() -> None:
    p, q = 0.1, 0.3
    model = BipolarFeatureModel(8, 16, firing_probability=p, positive_probability=q, seed=0)
    c = model.sample(40_000).coefficients
    fired = c != 0
    # magnitudes are constant (std 0) and positive: every firing is exactly +1 or -1
    assert set(c[fired].unique().tolist()) == {-1.0, 1.0}
    rate = fired.float().mean(0)
    assert ((rate - p).abs() < 0.01).all(), rate
    share = positive_share(*sign_counts(c))
    assert ((share - q).abs() < 0.03).all(), share


def test_bipolar_share_leaves_other_features_positive_only() -> None:
    model = BipolarFeatureModel(20, 16, firing_probability=0.2, bipolar_share=0.25, seed=1)
    assert int(model.is_bipolar.sum()) == 5
    pos, neg = sign_counts(model.sample(4000).coefficients)
    assert (neg[~model.is_bipolar] == 0).all()
    assert (pos[~model.is_bipolar] > 0).all()
    assert (neg[model.is_bipolar] > 0).all() and (pos[model.is_bipolar] > 0).all()


def test_seed_fixes_directions_and_stream() -> None:
    a = BipolarFeatureModel(10, 8, firing_probability=0.3, seed=7)
    b = BipolarFeatureModel(10, 8, firing_probability=0.3, seed=7)
    c = BipolarFeatureModel(10, 8, firing_probability=0.3, seed=8)
    torch.testing.assert_close(a.directions, b.directions)
    torch.testing.assert_close(a.sample(64).coefficients, b.sample(64).coefficients)
    assert not torch.equal(a.sample(64).coefficients, c.sample(64).coefficients)
    # successive batches differ, and sampling leaves the global RNG alone
    state = torch.random.get_rng_state()
    assert not torch.equal(a.sample(64).coefficients, a.sample(64).coefficients)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_accepts_sae_lens_probability_and_magnitude_configs() -> None:
    model = BipolarFeatureModel(
        30,
        16,
        firing_probability=ZipfianFiringProbabilityConfig(max_prob=0.4, min_prob=0.01),
        mean_magnitude=LinearMagnitudeConfig(start=1.0, end=3.0),
        seed=0,
    )
    c = model.sample(20_000).coefficients
    rate = (c != 0).float().mean(0)
    assert rate[0] > 0.3 and rate[-1] < 0.03  # Zipfian: descending
    mags = c.abs().amax(0)
    torch.testing.assert_close(mags, torch.linspace(1.0, 3.0, 30))


def test_seeded_streams_are_independent_and_reproducible() -> None:
    model = BipolarFeatureModel(10, 8, firing_probability=0.3, seed=0)
    first = next(model.batches(32, seed=1))
    assert first.shape == (32, 8)
    torch.testing.assert_close(next(model.batches(32, seed=1)), first)
    assert not torch.equal(next(model.batches(32, seed=2)), first)


def test_latents_per_feature_counts_both_signs() -> None:
    model = BipolarFeatureModel(6, 16, seed=0)
    d = model.directions
    # a non-negative dictionary needs +d and -d: two latents per feature
    assert latents_per_feature(torch.cat([d, -d]), d).tolist() == [2] * 6
    # a sign-aware one uses one; an unrelated latent counts for nothing
    unrelated = torch.linalg.svd(d, full_matrices=True)[2][-1:]  # orthogonal to every d_j
    assert latents_per_feature(torch.cat([2 * d, unrelated]), d).tolist() == [1] * 6


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="positive_probability"):
        BipolarFeatureModel(4, 8, positive_probability=1.0)
    with pytest.raises(ValueError, match="bipolar_share"):
        BipolarFeatureModel(4, 8, bipolar_share=1.5)
