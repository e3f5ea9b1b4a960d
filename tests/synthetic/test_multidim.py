"""Multi-dimensional ground-truth features (SPEC §6)."""

from __future__ import annotations

import pytest
import torch
from sae_lens.synthetic import ActivationGenerator

from sae_ext.synthetic.multidim import (
    MultiDimActivationIterator,
    MultiDimFeatureDictionary,
    make_multidim_data,
)

DIMS = [1, 2, 3, 4, 2]


def test_bases_are_orthonormal_and_mutually_orthogonal() -> None:
    fd = MultiDimFeatureDictionary(DIMS, hidden_dim=16, seed=3)
    bases = fd.ground_truth_bases()
    assert [b.shape for b in bases] == [(d, 16) for d in DIMS]
    stacked = torch.cat(bases)
    torch.testing.assert_close(stacked @ stacked.T, torch.eye(sum(DIMS)), atol=1e-6, rtol=0)


def test_overlapping_subspaces_when_not_orthogonal() -> None:
    fd = MultiDimFeatureDictionary([4] * 6, hidden_dim=8, orthogonal=False, seed=0)
    for b in fd.ground_truth_bases():
        torch.testing.assert_close(b @ b.T, torch.eye(4), atol=1e-6, rtol=0)
    a, b = fd.basis(0), fd.basis(1)
    assert (a @ b.T).abs().max() > 0.1  # 4 + 4 dims in R^8 at random: they overlap


def test_single_feature_gives_point_on_sphere_in_its_subspace_times_magnitude() -> None:
    fd = MultiDimFeatureDictionary(DIMS, hidden_dim=16, seed=0)
    g = torch.Generator().manual_seed(0)
    for i, d in enumerate(DIMS):
        mags = torch.zeros(200, len(DIMS))
        mags[:, i] = torch.rand(200, generator=g) * 3 + 0.5
        x = fd(mags, generator=g)
        torch.testing.assert_close(x.norm(dim=-1), mags[:, i], atol=1e-5, rtol=1e-5)
        basis = fd.basis(i)
        inside = x @ basis.T @ basis
        torch.testing.assert_close(inside, x, atol=1e-5, rtol=0)
        if d >= 2:
            # points cover the sphere: unit coordinates have mean ~0 and covariance ~I/d
            u = (x @ basis.T) / mags[:, i : i + 1]
            assert u.mean(0).abs().max() < 0.2
            torch.testing.assert_close(u.T @ u / 200, torch.eye(d) / d, atol=0.1, rtol=0)


def test_one_dimensional_features_are_non_negative_unless_bipolar() -> None:
    g = torch.Generator().manual_seed(0)
    mags = torch.ones(500, 1)
    plain = MultiDimFeatureDictionary([1], hidden_dim=4, seed=0)
    coords = plain.coordinates(mags, generator=g)
    assert (coords[..., 0] == 1).all()
    bipolar = MultiDimFeatureDictionary([1], hidden_dim=4, bipolar_1d=True, seed=0)
    coords = bipolar.coordinates(mags, generator=g)
    assert set(coords[..., 0].unique().tolist()) == {-1.0, 1.0}


def test_activation_is_sum_of_feature_contributions() -> None:
    fd = MultiDimFeatureDictionary(DIMS, hidden_dim=16, seed=0)
    mags = torch.rand(10, len(DIMS)) * (torch.rand(10, len(DIMS)) < 0.5)
    coords = fd.coordinates(mags, generator=torch.Generator().manual_seed(0))
    x = fd.embed(coords)
    manual = sum(coords[:, i, :d] @ fd.basis(i) for i, d in enumerate(DIMS))
    torch.testing.assert_close(x, manual, atol=1e-6, rtol=0)
    # features that did not fire contribute nothing
    assert (coords[mags == 0] == 0).all()
    torch.testing.assert_close(coords.norm(dim=-1), mags, atol=1e-6, rtol=0)


def test_iterator_uses_saelens_activation_generator() -> None:
    torch.manual_seed(0)
    it = make_multidim_data(DIMS, hidden_dim=16, firing_probability=0.3, batch_size=256, seed=1)
    assert isinstance(it.activations_generator, ActivationGenerator)
    batch = next(it)
    assert batch.shape == (256, 16)
    sample = it.sample(4000)
    fired = (sample.magnitudes > 0).float().mean(0)
    assert ((fired - 0.3).abs() < 0.05).all()
    assert len(sample.bases) == len(DIMS)
    torch.testing.assert_close(sample.activations, it.feature_dict.embed(sample.coordinates))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feature_dims": [], "hidden_dim": 4}, "at least one feature"),
        ({"feature_dims": [0, 2], "hidden_dim": 4}, r"\[1, hidden_dim=4\]; got \[0\]"),
        ({"feature_dims": [5], "hidden_dim": 4}, r"\[1, hidden_dim=4\]; got \[5\]"),
        ({"feature_dims": [3, 3], "hidden_dim": 4}, r"sum\(feature_dims\)=6 <= hidden_dim=4"),
    ],
)
def test_invalid_dictionaries(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiDimFeatureDictionary(**kwargs)


def test_iterator_rejects_mismatched_generator() -> None:
    fd = MultiDimFeatureDictionary([1, 2], hidden_dim=4)
    with pytest.raises(ValueError, match="must match"):
        MultiDimActivationIterator(fd, ActivationGenerator(3, 0.1), batch_size=8)
    with pytest.raises(ValueError, match="feature_magnitudes must be"):
        fd(torch.zeros(4, 3))
