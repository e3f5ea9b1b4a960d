"""The generator's v2 options (SPEC §2): a rare outlier token and a geometric dense spectrum;
the defaults draw exactly what the generator drew before them."""

from __future__ import annotations

import pytest
import torch

from sae_ext.synthetic.lowrank import SparsePlusLowRank, geometric_spectrum

D, N_FEAT, R = 16, 40, 3


def _gen(**kw) -> SparsePlusLowRank:
    kw.setdefault("orthogonalize", False)
    return SparsePlusLowRank(D, N_FEAT, R, seed=4, **kw)


def test_default_has_no_outliers_and_outliers_leave_the_other_rows_alone() -> None:
    plain, with_outliers = _gen(bias=1.5), _gen(bias=1.5, outlier_prob=0.05, outlier_norm=50.0)
    torch.testing.assert_close(plain.dense_basis, with_outliers.dense_basis, rtol=0, atol=0)
    torch.testing.assert_close(plain.feature_directions, with_outliers.feature_directions, rtol=0, atol=0)
    for _ in range(2):  # the stream continues identically
        a, b = plain.sample(2000), with_outliers.sample(2000)
        assert a.outlier_mask is not None and not a.outlier_mask.any()
        m = b.outlier_mask
        assert m is not None and 40 < int(m.sum()) < 170  # ~ 5 % of 2000
        assert torch.equal(a.activations[~m], b.activations[~m])
        assert torch.equal(a.feature_acts[~m], b.feature_acts[~m])
        # the outlier rows: one fixed vector of the given norm, nothing else
        assert torch.equal(b.activations[m], with_outliers.outlier_vector.expand(int(m.sum()), D))
        assert with_outliers.outlier_vector.norm().item() == pytest.approx(50.0, rel=1e-5)
        assert not b.feature_acts[m].any() and not b.dense_part[m].any() and not b.sparse_part[m].any()


def test_mean_offset_and_anisotropic_dense_part() -> None:
    std = geometric_spectrum(4.0, 1.0, R)
    assert std == pytest.approx([4.0, 2.0, 1.0])
    gen = _gen(bias=5.0, dense_std=std, firing_probabilities=0.02)
    s = gen.sample(20000)
    torch.testing.assert_close(s.activations.mean(0), gen.feature_dict.bias.detach(), atol=0.15, rtol=0)
    assert gen.feature_dict.bias.norm().item() == pytest.approx(5.0, rel=1e-5)
    var = (s.dense_part @ gen.dense_basis).var(0)
    torch.testing.assert_close(var, torch.tensor([16.0, 4.0, 1.0]), rtol=0.05, atol=0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"outlier_prob": -0.1}, "outlier_prob must be a number in \\[0, 1\\); got -0.1"),
        ({"outlier_prob": 1.0}, "outlier_prob"),
        ({"outlier_prob": True}, "outlier_prob"),
        ({"outlier_norm": 0.0}, "outlier_norm must be a finite number > 0; got 0.0"),
        ({"outlier_norm": float("inf")}, "outlier_norm"),
    ],
)
def test_bad_outlier_settings_are_clear_errors(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        _gen(**kw)


@pytest.mark.parametrize(
    ("args", "match"),
    [((1.0, 0.0, 3), "last must be"), ((0.0, 1.0, 3), "first must be"), ((1.0, 1.0, 0), "r must be")],
)
def test_bad_spectrum_is_a_clear_error(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        geometric_spectrum(*args)
