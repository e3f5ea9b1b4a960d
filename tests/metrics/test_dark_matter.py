"""Dark matter (SPEC §4) on constructed SAEs whose error structure is known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from sae_ext.metrics.dark_matter import (
    DarkMatterAccumulator,
    dark_matter,
    dark_matter_from_reconstructions,
    error_norm_predictability,
    holdout_mask,
    linear_error,
    nonlinear_error,
    sae_error_norms,
)

D = 8
N = 6000


def _x(n: int = N, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def _linear_error_sae(make_standard_sae, A: torch.Tensor, c: float = 10.0):
    """StandardSAE with SAE(x) = x A exactly: W_enc = I, b_enc = c (ReLU never clips for
    |x| < c), W_dec = A, b_dec = -c·1A. So e = x (I - A), an exact linear map of x."""
    d = A.shape[0]
    ones = torch.ones(d)
    return make_standard_sae(torch.eye(d), c * ones, A, -(c * ones) @ A)


def _abs_error_sae(make_standard_sae, d: int = D):
    """StandardSAE with SAE(x) = x - (|x| - m): e = |x| - m is uncorrelated with symmetric x."""
    m = math.sqrt(2 / math.pi)  # E|x| for x ~ N(0, 1)
    eye = torch.eye(d)
    W_enc = torch.cat([eye, -eye], dim=1)  # latents relu(x), relu(-x)
    W_dec = torch.cat([torch.zeros(d, d), -2 * eye], dim=0)  # SAE(x) = -2 relu(-x) + m
    return make_standard_sae(W_enc, torch.zeros(2 * d), W_dec, torch.full((d,), m))


def test_exact_linear_error_has_r2_one(make_standard_sae):
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(1)) * 0.3
    sae = _linear_error_sae(make_standard_sae, A)
    x = _x()
    res = dark_matter(sae, x, progress=False)
    assert res.error_r2 == pytest.approx(1.0, abs=1e-6)
    assert torch.all(res.per_dim_r2 > 1 - 1e-6)
    assert res.nonlinear_fvu == pytest.approx(0.0, abs=1e-6)
    assert res.linear_error_norm_share == pytest.approx(1.0, abs=1e-6)
    assert res.W.shape == (D, D)
    torch.testing.assert_close(res.W, (torch.eye(D) - A).double(), atol=1e-4, rtol=0)
    # the FVU of the SAE alone is what it is: Σ‖x(I-A)‖² / Σ‖x - x̄‖²
    mask = holdout_mask(N, 0.5, 0)
    xt = x[mask].double()
    e = xt @ (torch.eye(D) - A).double()
    assert res.fvu == pytest.approx(float((e**2).sum() / ((xt - xt.mean(0)) ** 2).sum()), rel=1e-5)
    # the helpers split e into linear + nonlinear parts
    with torch.no_grad():
        out = sae.decode(sae.encode(x))
    torch.testing.assert_close(linear_error(x, res.W), x - out, atol=1e-4, rtol=0)
    assert nonlinear_error(x, out, res.W).abs().max() < 1e-4


def test_independent_noise_error_has_r2_zero(function_sae):
    g = torch.Generator().manual_seed(5)
    sae = function_sae(D, lambda z: z + torch.randn(z.shape, generator=g))
    res = dark_matter(sae, _x(), progress=False)
    assert abs(res.error_r2) < 0.02
    assert res.nonlinear_fvu == pytest.approx(res.fvu, rel=0.02)
    assert res.linear_error_norm_share < 0.02


def test_uncorrelated_nonlinear_error_of_a_real_sae(make_standard_sae):
    sae = _abs_error_sae(make_standard_sae)
    res = dark_matter(sae, _x(), progress=False, fit_intercept=True)
    assert abs(res.error_r2) < 0.02
    assert abs(res.norm_r2) < 0.02
    # with the linear SAE the same data give r2 = 1: the score is about the error, not the data
    assert res.fvu > 0.1


def test_norm_r2_when_squared_norm_is_linear_in_x(function_sae):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(D, generator=g)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    offset = 40.0  # keeps x·w + offset > 0 on the data

    def reconstruct(z: torch.Tensor) -> torch.Tensor:
        return z - torch.sqrt(z @ w + offset)[:, None] * u  # ‖e‖² = x·w + offset

    x = _x()
    assert bool(((x @ w) + offset > 0).all())
    res = dark_matter(function_sae(D, reconstruct), x, progress=False, fit_intercept=True)
    assert res.norm_r2 == pytest.approx(1.0, abs=1e-6)
    assert res.W.shape == (D + 1, D)
    torch.testing.assert_close(res.norm_coef[:D], w.double(), atol=1e-4, rtol=0)
    assert res.norm_coef[D].item() == pytest.approx(offset, abs=1e-3)
    # without an intercept the constant cannot be fitted: strictly worse
    res0 = dark_matter(function_sae(D, reconstruct), x, progress=False)
    assert res0.norm_r2 < res.norm_r2 - 0.1


def test_intercept_option_fits_affine_error(make_standard_sae):
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(3)) * 0.3
    ones = torch.ones(D)
    # b_dec not cancelling the encoder bias: e = x(I - A) - (10·1A + b)
    b = torch.linspace(-1, 1, D)
    sae = make_standard_sae(torch.eye(D), 10 * ones, A, -(10 * ones) @ A + b)
    x = _x() + 3.0  # a mean the no-intercept fit can lean on, imperfectly
    with_b = dark_matter(sae, x, progress=False, fit_intercept=True)
    without = dark_matter(sae, x, progress=False, fit_intercept=False)
    assert with_b.error_r2 == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(with_b.W[D], -b.double(), atol=1e-4, rtol=0)
    assert without.error_r2 < 1 - 1e-3


def test_train_test_split_is_honoured():
    x = _x()
    g = torch.Generator().manual_seed(7)
    A = torch.randn(D, D, generator=g) * 0.3
    out = x - x @ A - 0.5 * torch.randn(N, D, generator=g)
    test = holdout_mask(N, 0.5, 0)
    assert 0.4 < test.float().mean() < 0.6

    base = dark_matter_from_reconstructions([(x, out)])
    assert base.n_test == int(test.sum()) and base.n_train == N - int(test.sum())

    # contaminate only test tokens: the fit is bit-identical, the score drops
    out_test = out.clone()
    out_test[test] += 5 * torch.randn(int(test.sum()), D, generator=g)
    dirty_test = dark_matter_from_reconstructions([(x, out_test)])
    assert torch.equal(dirty_test.W, base.W)
    assert dirty_test.error_r2 < base.error_r2 - 0.2

    # contaminate only train tokens: the fit changes
    out_train = out.clone()
    out_train[~test] += 5 * torch.randn(int((~test).sum()), D, generator=g)
    dirty_train = dark_matter_from_reconstructions([(x, out_train)])
    assert not torch.allclose(dirty_train.W, base.W, atol=1e-3)

    # another seed draws another split
    other = dark_matter_from_reconstructions([(x, out)], seed=1)
    assert not torch.equal(other.W, base.W)


def test_streaming_equals_in_memory(make_standard_sae):
    sae = _abs_error_sae(make_standard_sae)
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(4)) * 0.2
    x = _x() @ (torch.eye(D) + A)  # correlated inputs
    full = dark_matter(sae, x, progress=False, batch_size=N)
    cuts = [0, 7, 1000, 1001, 4500, N]
    chunks = [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    listed = dark_matter(sae, chunks, progress=False, batch_size=512)
    one_shot = dark_matter(sae, (c.reshape(-1, 1, D) for c in chunks), progress=False)
    for res in (listed, one_shot):
        assert (res.n_train, res.n_test) == (full.n_train, full.n_test)
        torch.testing.assert_close(res.W, full.W, atol=1e-10, rtol=1e-8)
        for key in ("error_r2", "norm_r2", "fvu", "nonlinear_fvu", "linear_error_norm_share"):
            assert getattr(res, key) == pytest.approx(getattr(full, key), rel=1e-8, abs=1e-10)


def test_accumulator_mean_error_and_counts():
    acc = DarkMatterAccumulator(3, test_fraction=0.25, seed=0)
    x = torch.arange(12.0).reshape(4, 3)
    acc.update(x, x - torch.tensor([1.0, 2.0, 3.0]))
    assert acc.n_tokens == 4
    torch.testing.assert_close(acc.mean_error(), torch.tensor([1.0, 2.0, 3.0]))


def test_input_validation(make_standard_sae, function_sae):
    sae = function_sae(D, lambda z: z)
    with pytest.raises(ValueError, match=r"last dimension must equal sae.cfg.d_in = 8"):
        dark_matter(sae, torch.randn(10, 5), progress=False)
    x = torch.randn(100, D)
    x[3, 1] = float("nan")
    x[7, 2] = float("inf")
    x[9, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"3 non-finite value"):
        dark_matter(sae, x, progress=False)
    bad_batch = torch.randn(10, D)
    bad_batch[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"activation batch 1 contain 1 non-finite"):
        dark_matter(sae, [torch.randn(10, D), bad_batch], progress=False)
    for frac in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="test_fraction must lie strictly between 0 and 1"):
            dark_matter(sae, torch.randn(10, D), test_fraction=frac, progress=False)
    with pytest.raises(ValueError, match="need at least 1 train and 2 test tokens"):
        dark_matter(sae, torch.randn(1, D), progress=False)
    with pytest.raises(ValueError, match=r"W has shape \(3, 8\)"):
        linear_error(torch.randn(4, D), torch.zeros(3, D))


def test_error_norm_predictability():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(500, generator=g) + 0.1
    exact = error_norm_predictability(a, 2 * a + 1)
    assert exact.r2 == pytest.approx(1.0, abs=1e-12)
    assert exact.slope == pytest.approx(2.0) and exact.intercept == pytest.approx(1.0)
    assert exact.n_tokens == 500
    noisy = error_norm_predictability(a, torch.rand(500, generator=g))
    assert abs(noisy.r2) < 0.05
    with pytest.raises(ValueError, match="errors_i_norms has 500 values but errors_j_norms has 3"):
        error_norm_predictability(a, torch.ones(3))
    with pytest.raises(ValueError, match="errors_j_norms contains 1 non-finite"):
        error_norm_predictability(a[:3], torch.tensor([1.0, float("nan"), 2.0]))


def test_error_norms_across_saes(make_standard_sae):
    """Two SAEs whose errors are e and 2e: per-token norms are perfectly predictable."""
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(6)) * 0.3
    small = _linear_error_sae(make_standard_sae, A)
    # SAE(x) = x A' with I - A' = 2 (I - A)  =>  A' = 2A - I
    large = _linear_error_sae(make_standard_sae, 2 * A - torch.eye(D))
    x = _x(2000) * 0.5
    ni = sae_error_norms(small, x, progress=False, batch_size=300)
    nj = sae_error_norms(large, x, progress=False)
    assert ni.shape == (2000,)
    res = error_norm_predictability(ni, nj)
    assert res.r2 == pytest.approx(1.0, abs=1e-6)
    assert res.slope == pytest.approx(2.0, rel=1e-4)


def test_too_few_train_tokens_for_the_fit_warns(make_standard_sae):
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(1)) * 0.3
    sae = _linear_error_sae(make_standard_sae, A)
    with pytest.warns(UserWarning, match="overfit"):
        dark_matter(sae, _x(n=40), progress=False)  # ~20 train tokens for 8 parameters per output
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dark_matter(sae, _x(), progress=False)  # 3000 train tokens: no warning
