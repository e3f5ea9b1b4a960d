"""The sparse-plus-dense-low-rank generator: decomposition, ground truth, statistics, errors."""

from __future__ import annotations

import pytest
import torch

from sae_ext.metrics.pca import pca_directions, principal_angle_cosines
from sae_ext.synthetic.lowrank import SparsePlusLowRank, sparse_plus_lowrank

D, N_FEAT, R = 16, 40, 3


def _gen(**kw) -> SparsePlusLowRank:
    kw.setdefault("orthogonalize", False)  # keep the tests fast
    return SparsePlusLowRank(D, N_FEAT, R, **kw)


def test_decomposition_and_ground_truth() -> None:
    gen = _gen(dense_std=2.0)
    s = gen.sample(500)
    assert s.activations.shape == (500, D)
    assert s.feature_acts.shape == (500, N_FEAT) and s.dense_codes.shape == (500, R)
    torch.testing.assert_close(s.activations, s.sparse_part + s.dense_part)
    torch.testing.assert_close(s.sparse_part, s.feature_acts @ s.feature_directions)
    # the ground-truth basis is orthonormal and the dense part lies in its span, exactly
    torch.testing.assert_close(s.dense_basis.T @ s.dense_basis, torch.eye(R), atol=1e-6, rtol=0)
    inside = (s.dense_part @ s.dense_basis) @ s.dense_basis.T
    torch.testing.assert_close(inside, s.dense_part, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.dense_part, 2.0 * s.dense_codes @ s.dense_basis.T)
    assert (s.feature_acts >= 0).all()


def test_statistics_match_the_parameters() -> None:
    gen = _gen(dense_std=[3.0, 2.0, 1.0], firing_probabilities=0.05)
    s = gen.sample(20000)
    # dense variance per direction = sigma^2
    var = s.dense_codes.var(0) * torch.tensor([9.0, 4.0, 1.0])
    torch.testing.assert_close(var, torch.tensor([9.0, 4.0, 1.0]), rtol=0.05, atol=0)
    assert gen.dense_variance() == pytest.approx(14.0)
    rates = (s.feature_acts > 0).float().mean(0)
    assert rates.mean().item() == pytest.approx(0.05, rel=0.05)


def test_default_features_are_not_dense_but_the_dense_part_dominates_pca() -> None:
    gen = _gen(dense_std=4.0)
    assert gen.firing_probabilities.max() < 0.1  # no ground-truth sparse feature is dense
    s = gen.sample(4000)
    cos = principal_angle_cosines(pca_directions(s.activations, R), s.dense_basis)
    assert cos.min() > 0.95


def test_orthogonal_to_dense_option() -> None:
    gen = _gen(orthogonal_to_dense=True)
    overlap = gen.feature_directions @ gen.dense_basis
    assert overlap.abs().max() < 1e-5
    torch.testing.assert_close(gen.feature_directions.norm(dim=-1), torch.ones(N_FEAT))
    assert (_gen().feature_directions @ _gen().dense_basis).abs().max() > 0.05


def test_reproducible_from_seed_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = _gen(seed=3), _gen(seed=3)
    first = a.sample(64)
    assert torch.equal(first.activations, b.sample(64).activations)
    assert not torch.equal(first.activations, a.sample(64).activations)  # the stream moves on
    assert not torch.equal(first.activations, _gen(seed=4).sample(64).activations)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_batches_stream_and_one_shot() -> None:
    stream = _gen().batches(32)
    x1, x2 = next(stream), next(stream)
    assert x1.shape == (32, D) and not torch.equal(x1, x2)
    one = sparse_plus_lowrank(10, d_in=D, n_features=N_FEAT, dense_rank=R, orthogonalize=False)
    assert one.activations.shape == (10, D)


def test_bias_offsets_every_activation() -> None:
    s = _gen(bias=5.0, dense_std=0.0, firing_probabilities=1e-6).sample(8)
    assert torch.allclose(s.activations.norm(dim=-1), torch.full((8,), 5.0), atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_in": 1}, "d_in"),
        ({"n_features": 0}, "n_features"),
        ({"dense_rank": 0}, r"1\.\.15"),
        ({"dense_rank": 16}, r"1\.\.15"),
        ({"dense_std": -1.0}, "dense_std"),
        ({"dense_std": [1.0, 2.0]}, "dense_std"),
        ({"firing_probabilities": 0.0}, r"\(0, 1\]"),
        ({"firing_probabilities": torch.full((3,), 0.1)}, r"\(0, 1\]"),
        ({"mean_magnitude": 0.0}, "mean_magnitude"),
        ({"std_magnitude": -1.0}, "std_magnitude"),
        ({"bias": -1.0}, "bias"),
    ],
)
def test_errors(kwargs, match) -> None:
    args = {"d_in": D, "n_features": N_FEAT, "dense_rank": R, "orthogonalize": False}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SparsePlusLowRank(**args)


def test_sample_size_error() -> None:
    with pytest.raises(ValueError, match="n must be"):
        _gen().sample(0)


def test_stream_seed_shares_ground_truth_but_not_samples() -> None:
    a, b = _gen(seed=5), _gen(seed=5, stream_seed=99)
    assert torch.equal(a.dense_basis, b.dense_basis)
    assert torch.equal(a.feature_directions, b.feature_directions)
    assert not torch.equal(a.sample(32).activations, b.sample(32).activations)
