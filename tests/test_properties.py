"""Issue 10: hypothesis property tests over random valid configs and inputs of every plugin SAE.

Inference SAEs get random (non-degenerate) weights in float64, so exact invariances can be
compared tightly; training SAEs are built by their own initialisation.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens import SAE
from sae_lens.saes.sae import TrainStepInput

from sae_ext.loading import load_sae
from sae_ext.saes.sasa import SASASAE, SASASAEConfig, SASATrainingSAE, SASATrainingSAEConfig
from sae_ext.saes.scaffold import (
    ScaffoldBatchTopKTrainingSAE,
    ScaffoldBatchTopKTrainingSAEConfig,
    ScaffoldJumpReLUSAE,
    ScaffoldJumpReLUSAEConfig,
    ScaffoldMatryoshkaBatchTopKTrainingSAE,
    ScaffoldMatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_ext.saes.sign_aware_gated import SignAwareGatedSAE, SignAwareGatedSAEConfig
from sae_ext.testing import train_step_input

PROPERTY = settings(max_examples=20, deadline=None)

seeds = st.integers(0, 2**31 - 1)
lead_shapes = st.one_of(
    st.tuples(st.integers(1, 12)), st.tuples(st.integers(1, 3), st.integers(1, 5))
)
scales = st.sampled_from([1e-3, 1.0, 30.0])


def _randomise(sae: SAE, seed: int) -> SAE:
    """Random weights; thresholds positive (linear-space thresholds of inference SAEs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if "threshold" in name:
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
    return sae


def _inputs(lead: tuple[int, ...], d_in: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(*lead, d_in, generator=g, dtype=torch.float64) * scale


def _check_common(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Shapes, finiteness, fold_W_dec_norm invariance and save/load invariance; returns f."""
    lead, d_in, d_sae = x.shape[:-1], sae.cfg.d_in, sae.cfg.d_sae
    with torch.no_grad():
        f = sae.encode(x)
        assert f.shape == (*lead, d_sae)
        recon = sae.decode(f)
        assert recon.shape == (*lead, d_in)
        out = sae(x)
        assert out.shape == x.shape
        assert torch.isfinite(f).all() and torch.isfinite(out).all()
        torch.testing.assert_close(recon, out)  # forward == decode(encode(x))

        # save / load (through sae_ext.load_sae) gives the same weights and the same function
        # (up to float64 rounding: loaded tensors may have other strides, so other BLAS paths)
        with tempfile.TemporaryDirectory() as d:
            sae.save_model(d)
            again = load_sae(d)
        assert type(again) is type(sae) and again.dtype == torch.float64
        for k, v in sae.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
        tol = 1e-12 * (1 + x.abs().max().item())
        torch.testing.assert_close(again.encode(x), f, rtol=1e-12, atol=tol)
        torch.testing.assert_close(again(x), out, rtol=1e-12, atol=tol)

        # fold_W_dec_norm: unit decoder rows, same reconstruction
        again.W_dec.mul_(torch.linspace(0.5, 2.0, d_sae, dtype=torch.float64)[:, None])
        before = again(x)
        again.fold_W_dec_norm()
        torch.testing.assert_close(
            again.W_dec.norm(dim=-1), torch.ones(d_sae, dtype=torch.float64), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            again(x), before, rtol=1e-9, atol=1e-9 * (1 + x.abs().max().item())
        )
    return f


# --------------------------------------------------------------------------- inference SAEs


@PROPERTY
@given(
    d_in=st.integers(2, 20),
    d_sae=st.integers(1, 40),
    two_sided=st.booleans(),
    tie_radii=st.booleans(),
    apply_b_dec_to_input=st.booleans(),
    lead=lead_shapes,
    seed=seeds,
    scale=scales,
)
def test_sign_aware_gated_properties(
    d_in: int, d_sae: int, two_sided: bool, tie_radii: bool, apply_b_dec_to_input: bool,
    lead: tuple[int, ...], seed: int, scale: float,
) -> None:  # fmt: skip
    cfg = SignAwareGatedSAEConfig(
        d_in=d_in, d_sae=d_sae, two_sided=two_sided, tie_radii=tie_radii,
        apply_b_dec_to_input=apply_b_dec_to_input, dtype="float64",
    )  # fmt: skip
    sae = _randomise(SignAwareGatedSAE(cfg), seed)
    x = _inputs(lead, d_in, seed, scale)
    f = _check_common(sae, x)
    if not two_sided:
        assert (f >= 0).all()
    # a latent fires with the polarity of its gate: positive only above θ⁺, negative only below −θ⁻
    with torch.no_grad():
        pi = sae.process_sae_in(x) @ sae.W_enc + sae.b_gate
    assert ((f > 0) <= (pi > sae.threshold_pos)).all()
    if two_sided:
        assert ((f < 0) <= (-pi > sae.threshold_neg)).all()


@PROPERTY
@given(
    d_in=st.integers(2, 20),
    d_sae=st.integers(1, 40),
    rank_frac=st.floats(0.0, 1.0),
    encoder_input=st.sampled_from(["full", "residual"]),
    lead=lead_shapes,
    seed=seeds,
    scale=scales,
)
def test_scaffold_jumprelu_properties(
    d_in: int, d_sae: int, rank_frac: float, encoder_input: str, lead: tuple[int, ...],
    seed: int, scale: float,
) -> None:  # fmt: skip
    rank = 1 + int(rank_frac * (d_in - 2))  # any rank in 1..d_in-1
    cfg = ScaffoldJumpReLUSAEConfig(
        d_in=d_in, d_sae=d_sae, scaffold_rank=rank, scaffold_encoder_input=encoder_input,
        dtype="float64",
    )  # fmt: skip
    sae = _randomise(ScaffoldJumpReLUSAE(cfg), seed)
    x = _inputs(lead, d_in, seed, scale)
    f = _check_common(sae, x)
    assert (f >= 0).all()
    with torch.no_grad():
        # JumpReLU: every active latent is above its threshold; x̂ = f W_dec + s + b_dec
        x_tilde = x - sae.b_dec  # apply_b_dec_to_input (the default)
        s = sae.scaffold(x)
        torch.testing.assert_close(s, x_tilde @ sae.scaffold_V @ sae.scaffold_U)
        encoder_in = x_tilde - s if encoder_input == "residual" else x_tilde
        hidden = encoder_in @ sae.W_enc + sae.b_enc
        assert ((f != 0) <= (hidden > sae.threshold)).all()
        assert ((hidden > sae.threshold) & (hidden > 0) <= (f != 0)).all()
        torch.testing.assert_close(sae(x), f @ sae.W_dec + s + sae.b_dec)
        # the scaffold is a rank-≤r map
        assert torch.linalg.matrix_rank(sae.scaffold_V @ sae.scaffold_U).item() <= rank


@PROPERTY
@given(
    d_in=st.integers(2, 20),
    group_rank=st.integers(1, 4),
    n_groups=st.integers(1, 12),
    s_frac=st.floats(0.0, 1.0),
    lead=lead_shapes,
    seed=seeds,
    scale=scales,
)
def test_sasa_properties(
    d_in: int, group_rank: int, n_groups: int, s_frac: float, lead: tuple[int, ...],
    seed: int, scale: float,
) -> None:  # fmt: skip
    s = 1 + int(s_frac * (n_groups - 1))  # any s in 1..K
    cfg = SASASAEConfig(
        d_in=d_in, d_sae=n_groups * group_rank, group_rank=group_rank, n_active_groups=s,
        dtype="float64",
    )  # fmt: skip
    sae = _randomise(SASASAE(cfg), seed)
    x = _inputs(lead, d_in, seed, scale)
    f = _check_common(sae, x)
    groups = sae.group_acts(f)  # [..., K, r]
    active = (groups != 0).any(-1)
    assert ((f != 0).sum(-1) <= s * group_rank).all()  # at most s·r non-zero columns per token
    assert (active.sum(-1) == s).all()  # exactly s groups per token
    # ... and they are the s groups with the largest scores
    chosen = sae.active_groups(x)
    assert active.gather(-1, chosen).all()


# --------------------------------------------------------------------------- training SAEs


def _step(x: torch.Tensor, d_sae: int) -> TrainStepInput:
    return train_step_input(x, d_sae)


@st.composite
def batchtopk_cases(draw: Any) -> dict[str, Any]:
    d_in = draw(st.integers(2, 16))
    d_sae = draw(st.integers(1, 48))
    matryoshka = draw(st.booleans())
    case = {
        "d_in": d_in,
        "d_sae": d_sae,
        "scaffold_rank": draw(st.integers(1, d_in - 1)),
        "scaffold_encoder_input": draw(st.sampled_from(["full", "residual"])),
        "scaffold_init": draw(st.sampled_from(["pca", "random"])),
        "k": draw(st.one_of(st.integers(1, d_sae), st.floats(0.05, float(d_sae)))),
    }
    if matryoshka:
        inner = draw(st.lists(st.integers(1, max(1, d_sae - 1)), max_size=3, unique=True))
        case["matryoshka_widths"] = sorted(w for w in inner if w < d_sae) + [d_sae]
    return case


@PROPERTY
@given(case=batchtopk_cases(), n=st.integers(2, 40), all_positive=st.booleans(), seed=seeds)
def test_batchtopk_family_training_l0(
    case: dict[str, Any], n: int, all_positive: bool, seed: int
) -> None:
    matryoshka = "matryoshka_widths" in case
    cls, cfg_cls = (
        (ScaffoldMatryoshkaBatchTopKTrainingSAE, ScaffoldMatryoshkaBatchTopKTrainingSAEConfig)
        if matryoshka
        else (ScaffoldBatchTopKTrainingSAE, ScaffoldBatchTopKTrainingSAEConfig)
    )
    torch.manual_seed(seed)
    sae = cls(cfg_cls(**case))
    if all_positive:
        with torch.no_grad():
            sae.b_enc.fill_(
                100.0
            )  # every pre-activation positive: BatchTopK must keep exactly ⌊k·n⌋
    x = _inputs((n,), case["d_in"], seed, 1.0).float()
    with torch.no_grad():
        out = sae.training_forward_pass(_step(x, case["d_sae"]))
    assert out.feature_acts.shape == (n, case["d_sae"]) and out.sae_out.shape == (n, case["d_in"])
    assert torch.isfinite(out.loss) and torch.isfinite(out.sae_out).all()
    n_active = int((out.feature_acts != 0).sum())
    budget = int(case["k"] * n)  # SAELens BatchTopK keeps ⌊k·n⌋ values over the whole batch
    assert n_active == min(budget, int((out.hidden_pre > 0).sum()))
    if all_positive:
        assert n_active == budget
        if float(case["k"]).is_integer():
            assert (out.feature_acts != 0).sum(-1).double().mean().item() == case[
                "k"
            ]  # mean L0 == k
    assert (out.feature_acts >= 0).all()


@PROPERTY
@given(
    d_in=st.integers(2, 16),
    group_rank=st.integers(1, 4),
    n_groups=st.integers(1, 10),
    s_frac=st.floats(0.0, 1.0),
    n=st.integers(1, 24),
    seed=seeds,
)
def test_sasa_training_l0(
    d_in: int, group_rank: int, n_groups: int, s_frac: float, n: int, seed: int
) -> None:
    s = 1 + int(s_frac * (n_groups - 1))
    torch.manual_seed(seed)
    cfg = SASATrainingSAEConfig(
        d_in=d_in, d_sae=n_groups * group_rank, group_rank=group_rank, n_active_groups=s
    )
    sae = SASATrainingSAE(cfg)
    x = _inputs((n,), d_in, seed, 1.0).float()
    out = sae.training_forward_pass(_step(x, cfg.d_sae))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in sae.parameters())
    active = (sae.group_acts(out.feature_acts) != 0).any(-1)
    assert (active.sum(-1) == s).all()
    assert ((out.feature_acts != 0).sum(-1) <= s * group_rank).all()
