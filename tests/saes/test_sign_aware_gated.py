"""SA-GSAE (SPEC §1): autograd functions, equations, reductions, switches, dtypes, folds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.gated_sae import (
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput

from sae_ext.activations import (
    BiJumpReLU,
    BiJumpReLUFunction,
    SignAwareGatedCodeFunction,
    TwoSidedStepFunction,
    bi_jump_relu,
    sign_aware_gated_code,
    two_sided_step,
)
from sae_ext.saes.sign_aware_gated import (
    SignAwareGatedSAE,
    SignAwareGatedSAEConfig,
    SignAwareGatedTrainingSAE,
    SignAwareGatedTrainingSAEConfig,
)

D_IN, D_SAE = 16, 24


def _cfg(**kw) -> SignAwareGatedTrainingSAEConfig:
    return SignAwareGatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kw)


def _randomize(sae: SignAwareGatedTrainingSAE | SignAwareGatedSAE, seed: int = 0) -> None:
    """Random weights, biases, radii and thresholds, so every term of the encoder matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if "threshold" in name:
                theta = 0.05 + 0.3 * noise.abs()
                p.copy_(theta.log() if name.startswith("log_") else theta)
            elif name.startswith(("b_", "r_")):
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(D_IN))


def _step(
    sae: SignAwareGatedTrainingSAE, x: torch.Tensor, dead: torch.Tensor | None = None, logging: bool = True
):
    return sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={"l1": sae.cfg.l1_coefficient},
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=logging,
        )
    )


def _spec_forward(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §1, written out directly from the parameters: (f, x_hat, pi)."""
    theta_pos, theta_neg = sae.thresholds()
    rho_pos = sae.r_mag
    rho_neg = sae.r_mag if sae.cfg.tie_radii else sae.r_mag_neg
    mu = (x - sae.b_dec) @ sae.W_enc
    pi = mu + sae.b_gate
    gate_pos = (pi > theta_pos).float()
    gate_neg = (-pi > theta_neg).float()
    m_pos = torch.relu(torch.exp(rho_pos) * mu + sae.b_mag)
    m_neg = torch.relu(-torch.exp(rho_neg) * mu + sae.b_mag)
    f = gate_pos * m_pos - gate_neg * m_neg
    return f, f @ sae.W_dec + sae.b_dec, pi


# --------------------------------------------------------------------------- autograd functions


def _away_from_jumps(n: int, theta_pos: float, theta_neg: float, margin: float) -> torch.Tensor:
    """Points at least ``margin`` from both jumps, on both sides of both."""
    g = torch.Generator().manual_seed(0)
    offsets = margin + torch.rand(n, generator=g, dtype=torch.float64)
    sides = torch.arange(n) % 4
    return torch.where(
        sides == 0,
        theta_pos + offsets,  # fires positive
        torch.where(
            sides == 1,
            theta_pos - offsets.clamp(max=theta_pos - margin),  # dead zone, below θ⁺
            torch.where(
                sides == 2, -theta_neg - offsets, -theta_neg + offsets.clamp(max=theta_neg - margin)
            ),
        ),
    )


@pytest.mark.parametrize("two_sided", [True, False])
def test_gradcheck_bi_jump_relu_away_from_jumps(two_sided: bool) -> None:
    eps = 0.05
    theta_pos = torch.full((5,), 0.4, dtype=torch.float64, requires_grad=True)
    theta_neg = (
        torch.full((5,), 0.3, dtype=torch.float64, requires_grad=True) if two_sided else None
    )
    z = _away_from_jumps(40, 0.4, 0.3, margin=eps).reshape(8, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z, tp, tn: BiJumpReLUFunction.apply(z, tp, tn, eps), (z, theta_pos, theta_neg)
    )


@pytest.mark.parametrize("two_sided", [True, False])
def test_gradcheck_two_sided_step_away_from_jumps(two_sided: bool) -> None:
    eps = 0.05
    theta_pos = torch.full((5,), 0.4, dtype=torch.float64, requires_grad=True)
    theta_neg = (
        torch.full((5,), 0.3, dtype=torch.float64, requires_grad=True) if two_sided else None
    )
    z = _away_from_jumps(40, 0.4, 0.3, margin=eps).reshape(8, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z, tp, tn: TwoSidedStepFunction.apply(z, tp, tn, eps), (z, theta_pos, theta_neg)
    )


def test_pseudo_derivatives_inside_the_kernel_window() -> None:
    """SPEC §1's straight-through estimates on hand-picked points (θ⁺=.5, θ⁻=.3, ε=.2)."""
    eps = 0.2
    z = torch.tensor([0.45, 0.55, 1.0, -0.35, -0.25, 0.0], requires_grad=True)
    theta_pos = torch.tensor(0.5, requires_grad=True)
    theta_neg = torch.tensor(0.3, requires_grad=True)

    y = bi_jump_relu(z, theta_pos, theta_neg, eps)
    assert y.tolist() == pytest.approx([0.0, 0.55, 1.0, -0.35, 0.0, 0.0])
    y.sum().backward()
    assert z.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # two points within ε/2 of each threshold: −(θ⁺/ε)·2 and +(θ⁻/ε)·2
    assert theta_pos.grad.item() == pytest.approx(-0.5 / 0.2 * 2)
    assert theta_neg.grad.item() == pytest.approx(0.3 / 0.2 * 2)

    z.grad = theta_pos.grad = theta_neg.grad = None
    gate_pos, gate_neg = two_sided_step(z, theta_pos, theta_neg, eps)
    assert gate_pos.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert gate_neg.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    (gate_pos.sum() + 3 * gate_neg.sum()).backward()
    assert z.grad is None or not z.grad.any()  # no straight-through to the input
    assert theta_pos.grad.item() == pytest.approx(-2 / 0.2)
    assert theta_neg.grad.item() == pytest.approx(-3 * 2 / 0.2)


def test_bf16_input_is_compared_in_float32() -> None:
    theta = torch.tensor([1.004])  # rounds to 1.0078125 in bfloat16
    z = torch.tensor([1.0078125], dtype=torch.bfloat16)
    assert bool((z > theta.to(torch.bfloat16))[0]) is False
    out = bi_jump_relu(z, theta, theta, 0.05)
    assert out.dtype == torch.bfloat16 and out.item() == pytest.approx(1.0078125)
    gate_pos, _ = two_sided_step(z, theta, theta, 0.05)
    assert gate_pos.item() == 1.0


def test_bi_jump_relu_module_keeps_float32_log_thresholds() -> None:
    act = BiJumpReLU(6, initial_threshold=0.2, bandwidth=0.1).to(torch.bfloat16)
    assert act.log_threshold_pos.dtype == torch.float32
    assert act.log_threshold_neg is not None and act.log_threshold_neg.dtype == torch.float32
    torch.testing.assert_close(act.threshold_pos, torch.full((6,), 0.2))
    z = torch.tensor([[0.5, 0.1, -0.1, -0.5, 0.25, -0.25]], dtype=torch.bfloat16)
    y = act(z)
    assert y.dtype == torch.bfloat16
    assert (y != 0).tolist() == [[True, False, False, True, True, True]]
    y.float().sum().backward()
    assert act.log_threshold_pos.grad is not None
    assert act.log_threshold_pos.grad.dtype == torch.float32
    one_sided = BiJumpReLU(6, initial_threshold=0.2, two_sided=False)
    assert one_sided.log_threshold_neg is None and (one_sided(z.float()) >= 0).all()
    gates = act.gates(z)
    assert gates[1].tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0, 1.0]]


# --------------------------------------------------------------------------- fused training encoder


@pytest.mark.parametrize("mode", ["tied", "untied", "one_sided"])
def test_gradcheck_fused_code_away_from_jumps(mode: str) -> None:
    """The fused encoder's μ, π, b_mag, ρ and ‖W_dec‖ gradients against finite differences.

    Points sit ≥ ε from the jumps (so the straight-through θ terms are 0 on both sides) and
    the magnitudes ≥ 0.05 from their ReLU kinks; the θ terms are checked against the unfused
    composition below.
    """
    eps, b, h = 0.05, 8, 5
    g = torch.Generator().manual_seed(3)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)

    pi = _away_from_jumps(b * h, 0.4, 0.3, margin=eps).reshape(b, h).requires_grad_(True)
    mu_abs = 0.1 + torch.rand(b, h, generator=g, dtype=torch.float64)
    mu = (mu_abs * torch.randn(b, h, generator=g, dtype=torch.float64).sign()).requires_grad_(True)
    b_mag, rho_pos, rho_neg = rand(h, scale=0.02), rand(h, scale=0.1), rand(h, scale=0.1)
    theta_pos = torch.full((h,), 0.4, dtype=torch.float64, requires_grad=True)
    theta_neg = torch.full((h,), 0.3, dtype=torch.float64, requires_grad=True)
    norms = (0.5 + torch.rand(h, generator=g, dtype=torch.float64)).requires_grad_(True)
    apply = SignAwareGatedCodeFunction.apply
    if mode == "tied":
        fn = lambda mu, pi, bm, r, tp, tn, n: apply(mu, pi, bm, r, r, tp, tn, n, eps)  # noqa: E731
        inputs = (mu, pi, b_mag, rho_pos, theta_pos, theta_neg, norms)
    elif mode == "untied":
        fn = lambda mu, pi, bm, rp, rn, tp, tn, n: apply(mu, pi, bm, rp, rn, tp, tn, n, eps)  # noqa: E731
        inputs = (mu, pi, b_mag, rho_pos, rho_neg, theta_pos, theta_neg, norms)
    else:
        fn = lambda mu, pi, bm, r, tp, n: apply(mu, pi, bm, r, r, tp, None, n, eps)  # noqa: E731
        inputs = (mu, pi, b_mag, rho_pos, theta_pos, norms)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(
    "kw",
    [{}, {"tie_radii": False}, {"two_sided": False}, {"aux_coefficient": 0.0}, {"apply_b_dec_to_input": False}],
    ids=["default", "untied", "one_sided", "no_aux", "no_b_dec_in"],
)
def test_fused_training_step_equals_the_unfused_composition(kw: dict) -> None:
    """Losses and every parameter gradient of a training step, fused vs. composed from
    :func:`two_sided_step`, the magnitude ReLUs and :func:`bi_jump_relu` (float64), with
    many entries inside the straight-through windows."""
    sae = SignAwareGatedTrainingSAE(_cfg(dtype="float64", l1_coefficient=0.7, bandwidth=0.2, **kw))
    _randomize(sae)
    ref = SignAwareGatedTrainingSAE(_cfg(dtype="float64", l1_coefficient=0.7, bandwidth=0.2, **kw))
    ref.load_state_dict(sae.state_dict())
    ref.encode_with_hidden_pre = lambda x: ref._encode(x, ref._ste_gates)  # type: ignore[method-assign]
    x = torch.randn(256, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, out_ref = _step(sae, x), _step(ref, x)
    theta = sae.thresholds()[0].detach()
    in_window = ((out.hidden_pre.detach() - theta).abs() <= 0.1).sum()
    assert in_window > 50  # the θ pseudo-derivatives are exercised
    torch.testing.assert_close(out.feature_acts, out_ref.feature_acts, rtol=1e-12, atol=1e-12)
    for name in out_ref.losses:
        torch.testing.assert_close(out.losses[name], out_ref.losses[name], rtol=1e-12, atol=1e-12)
    (out.loss).backward()
    out_ref.loss.backward()
    for (name, p), p_ref in zip(sae.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)
    assert sae._gate_cache is None  # no graph kept alive between steps


def test_fused_code_rejects_mismatched_shapes_and_bandwidth() -> None:
    mu, v = torch.zeros(4, 6), torch.ones(6)
    args = (mu, mu, v, v, v, v, v, v)
    assert sign_aware_gated_code(*args, 0.1)[0].shape == (4, 6)
    with pytest.raises(ValueError, match=r"same \[batch, d_sae\] shape, got \(4, 6\) and \(4, 5\)"):
        sign_aware_gated_code(mu, torch.zeros(4, 5), *args[2:], 0.1)
    with pytest.raises(ValueError, match=r"shape \(6,\) to match d_sae; got \{'theta_pos': \(5,\)\}"):
        sign_aware_gated_code(mu, mu, v, v, v, torch.ones(5), v, v, 0.1)
    with pytest.raises(ValueError, match="bandwidth must be a finite number > 0, got 0.0"):
        sign_aware_gated_code(*args, 0.0)


def test_aux_loss_for_another_hidden_pre_recomputes_the_gate_code() -> None:
    sae = SignAwareGatedTrainingSAE(_cfg(dtype="float64"))
    _randomize(sae)
    x = torch.randn(32, D_IN, dtype=torch.float64)
    f, pi = sae.encode_with_hidden_pre(x)
    other = pi + 0.3
    step = TrainStepInput(sae_in=x, coefficients={"l1": 1.0}, dead_neuron_mask=None, n_training_steps=0,
                          is_logging_step=False)
    losses = sae.calculate_aux_loss(step, f, other, f @ sae.W_dec)
    gate = bi_jump_relu(other, *sae.thresholds(), sae.cfg.bandwidth)
    expected = (gate.abs() * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(losses["l1_loss"], expected)


# --------------------------------------------------------------------------- equations


@pytest.mark.parametrize("tie_radii", [True, False])
def test_forward_matches_spec_formulas(tie_radii: bool) -> None:
    sae = SignAwareGatedTrainingSAE(_cfg(tie_radii=tie_radii))
    _randomize(sae)
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        f_spec, x_hat_spec, pi_spec = _spec_forward(sae, x)
        f, pi = sae.encode_with_hidden_pre(x)
        torch.testing.assert_close(f, f_spec)
        torch.testing.assert_close(pi, pi_spec)
        torch.testing.assert_close(sae.decode(f), x_hat_spec)
    # both polarities are exercised
    assert (f > 0).any() and (f < 0).any() and (f == 0).any()


@pytest.mark.parametrize("tie_radii", [True, False])
def test_loss_matches_spec_formula(tie_radii: bool) -> None:
    sae = SignAwareGatedTrainingSAE(
        _cfg(tie_radii=tie_radii, l1_coefficient=0.7, aux_coefficient=1.3)
    )
    _randomize(sae)
    x = torch.randn(64, D_IN)
    out = _step(sae, x)
    with torch.no_grad():
        _, x_hat, pi = _spec_forward(sae, x)
        theta_pos, theta_neg = sae.thresholds()
        bj = pi * ((pi > theta_pos) | (-pi > theta_neg)).float()
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l1 = 0.7 * (bj.abs() * sae.W_dec.norm(dim=1)).sum(-1).mean()
        aux = 1.3 * (x - (bj @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse_loss"], mse)
    torch.testing.assert_close(out.losses["l1_loss"], l1)
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"], aux)
    torch.testing.assert_close(out.loss, mse + l1 + aux)


def test_auxiliary_term_uses_a_frozen_decoder() -> None:
    sae = SignAwareGatedTrainingSAE(_cfg())
    _randomize(sae)
    out = _step(sae, torch.randn(32, D_IN))
    out.losses["auxiliary_reconstruction_loss"].backward()
    assert sae.W_dec.grad is None or not sae.W_dec.grad.any()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.any()
    assert sae.b_gate.grad is not None and sae.b_gate.grad.any()


def test_inference_encoder_matches_training_encoder(tmp_path: Path) -> None:
    sae = SignAwareGatedTrainingSAE(_cfg(tie_radii=False))
    _randomize(sae)
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, SignAwareGatedSAE)
    assert not loaded.cfg.tie_radii and loaded.cfg.two_sided
    torch.testing.assert_close(loaded.threshold_pos.data, sae.log_threshold_pos.exp().detach())
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))
        torch.testing.assert_close(loaded(x), sae(x))


def test_training_checkpoint_loads_as_inference_sae(tmp_path: Path) -> None:
    sae = SignAwareGatedTrainingSAE(_cfg())
    _randomize(sae)
    sae.save_model(tmp_path)  # training state dict: log thresholds
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, SignAwareGatedSAE)
    x = torch.randn(16, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))


# --------------------------------------------------------------------------- reduction to gated


def test_one_sided_with_vanishing_thresholds_equals_sae_lens_gated() -> None:
    sa = SignAwareGatedTrainingSAE(_cfg(two_sided=False, l1_coefficient=0.5))
    _randomize(sa)
    with torch.no_grad():
        sa.log_threshold_pos.fill_(-60.0)  # θ⁺ ≈ 1e-26
    gated = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.5))
    gated.load_state_dict({k: v for k, v in sa.state_dict().items() if k in gated.state_dict()})
    x = torch.randn(64, D_IN)
    out_sa, out_g = _step(sa, x), _step(gated, x)
    torch.testing.assert_close(out_sa.feature_acts, out_g.feature_acts)
    torch.testing.assert_close(out_sa.sae_out, out_g.sae_out)
    for name in ("mse_loss", "l1_loss", "auxiliary_reconstruction_loss"):
        torch.testing.assert_close(out_sa.losses[name], out_g.losses[name])
    out_sa.loss.backward()
    out_g.loss.backward()
    # the encoder gradients agree; SAELens's auxiliary term also trains the decoder,
    # SPEC's uses a frozen copy, so W_dec and b_dec gradients differ by design
    for name in ("W_enc", "b_gate", "b_mag", "r_mag"):
        torch.testing.assert_close(getattr(sa, name).grad, getattr(gated, name).grad)

    inference = SignAwareGatedSAE(SignAwareGatedSAEConfig(d_in=D_IN, d_sae=D_SAE, two_sided=False))
    gated_inference = GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE))
    state = {k: v for k, v in gated.state_dict().items()}
    inference.load_state_dict({**state, "threshold_pos": torch.zeros(D_SAE)})
    gated_inference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), gated_inference(x))


# --------------------------------------------------------------------------- bipolar sharing


@pytest.mark.parametrize("cls", ["training", "inference"])
def test_one_latent_fires_both_signs_along_its_direction(cls: str) -> None:
    """A latent whose encoder/decoder is direction d fires +a for x = a·d and −a for x = −a·d."""
    if cls == "training":
        sae = SignAwareGatedTrainingSAE(_cfg(initial_threshold=0.1))
    else:
        sae = SignAwareGatedSAE(SignAwareGatedSAEConfig(d_in=D_IN, d_sae=D_SAE))
    dirs = torch.linalg.qr(torch.randn(D_IN, D_IN))[0].T  # orthonormal rows
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_dec[:D_IN] = dirs
        sae.W_enc.copy_(sae.W_dec.T)
        if cls == "training":
            sae.log_threshold_pos.fill_(math.log(0.1))
            sae.log_threshold_neg.fill_(math.log(0.1))
        else:
            sae.threshold_pos.fill_(0.1)
            sae.threshold_neg.fill_(0.1)
        for sign in (1.0, -1.0):
            x = sign * 1.5 * dirs[3]
            f = sae.encode(x[None])[0]
            assert f[3].item() == pytest.approx(sign * 1.5)
            assert (f != 0).sum() == 1
            torch.testing.assert_close(sae.decode(f[None])[0], x)
        # inside the dead zone nothing fires
        assert not sae.encode(0.05 * dirs[3][None]).any()


# --------------------------------------------------------------------------- ablation switches


def test_two_sided_false_never_fires_negative() -> None:
    sae = SignAwareGatedTrainingSAE(_cfg(two_sided=False))
    _randomize(sae)
    names = dict(sae.named_parameters())
    assert "log_threshold_neg" not in names and "r_mag_neg" not in names
    out = _step(sae, torch.randn(256, D_IN))
    assert (out.feature_acts >= 0).all() and (out.feature_acts > 0).any()
    assert out.metrics["negative_firing_share"] == 0
    assert "mean_threshold_neg" not in out.metrics
    two_sided = SignAwareGatedTrainingSAE(_cfg(two_sided=True))
    two_sided.load_state_dict({**sae.state_dict(), "log_threshold_neg": sae.log_threshold_pos.data})
    out2 = _step(two_sided, torch.randn(256, D_IN))
    assert (out2.feature_acts < 0).any()


def test_untied_radii_change_only_the_negative_side() -> None:
    sae = SignAwareGatedTrainingSAE(_cfg(tie_radii=False))
    _randomize(sae)
    assert "r_mag_neg" in dict(sae.named_parameters())
    assert "r_mag_neg" not in dict(SignAwareGatedTrainingSAE(_cfg()).named_parameters())
    x = torch.randn(128, D_IN)
    with torch.no_grad():
        before = sae.encode(x)
        sae.r_mag_neg.add_(1.0)
        after = sae.encode(x)
    pos = before > 0
    torch.testing.assert_close(after[pos], before[pos])
    neg = before < 0
    assert neg.any() and (after[neg] != before[neg]).all()  # m⁻ depends on e^{ρ⁻}


@pytest.mark.parametrize("aux_coefficient", [0.0, 1.0])
def test_aux_coefficient_zero_removes_the_gate_reconstruction(aux_coefficient: float) -> None:
    # with λ = 0 the gate bias is trained by the auxiliary term alone
    sae = SignAwareGatedTrainingSAE(_cfg(l1_coefficient=0.0, aux_coefficient=aux_coefficient))
    _randomize(sae)
    out = _step(sae, torch.randn(64, D_IN))
    out.loss.backward()
    gate_grad = sae.b_gate.grad
    if aux_coefficient == 0:
        assert out.losses["auxiliary_reconstruction_loss"] == 0
        assert gate_grad is None or not gate_grad.any()
    else:
        assert out.losses["auxiliary_reconstruction_loss"] > 0
        assert gate_grad is not None and gate_grad.any()


@pytest.mark.parametrize("enabled", [True, False])
def test_dead_threshold_reset(enabled: bool) -> None:
    sae = SignAwareGatedTrainingSAE(_cfg(dead_threshold_reset=enabled, initial_threshold=0.01))
    with torch.no_grad():
        sae.log_threshold_pos.fill_(math.log(0.5))
        sae.log_threshold_neg.fill_(math.log(0.5))
        sae.log_threshold_neg[3] = math.log(0.001)  # already below initial: left alone
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[0, 3]] = True
    out = _step(sae, torch.randn(8, D_IN), dead=dead)
    theta_pos, theta_neg = (t.detach() for t in sae.thresholds())
    alive = ~dead
    torch.testing.assert_close(theta_pos[alive], torch.full((D_SAE - 2,), 0.5))
    torch.testing.assert_close(theta_neg[alive], torch.full((D_SAE - 2,), 0.5))
    assert theta_neg[3].item() == pytest.approx(0.001)
    if enabled:
        torch.testing.assert_close(theta_pos[dead], torch.full((2,), 0.01))
        assert theta_neg[0].item() == pytest.approx(0.01)
        assert out.metrics["dead_threshold_resets"] == 2
    else:
        torch.testing.assert_close(theta_pos[dead], torch.full((2,), 0.5))
        assert out.metrics["dead_threshold_resets"] == 0


def test_training_metrics() -> None:
    sae = SignAwareGatedTrainingSAE(_cfg())
    _randomize(sae)
    quiet = _step(sae, torch.randn(128, D_IN), logging=False)
    assert "l0" not in quiet.metrics  # firing statistics only on the trainer's logging steps
    assert "dead_threshold_resets" in quiet.metrics
    out = _step(sae, torch.randn(128, D_IN))
    f = out.feature_acts
    n = (f != 0).sum()
    assert out.metrics["l0"] == pytest.approx((f != 0).sum(-1).float().mean().item())
    assert out.metrics["positive_firing_share"] == pytest.approx(((f > 0).sum() / n).item())
    assert out.metrics["negative_firing_share"] == pytest.approx(((f < 0).sum() / n).item())
    assert 0 < out.metrics["negative_firing_share"] < 1
    assert out.metrics["mean_threshold_pos"] == pytest.approx(
        sae.log_threshold_pos.exp().mean().item()
    )
    assert out.metrics["mean_threshold_neg"] == pytest.approx(
        sae.log_threshold_neg.exp().mean().item()
    )


# --------------------------------------------------------------------------- dtypes


def test_bf16_sae_keeps_float32_thresholds(tmp_path: Path) -> None:
    sae = SignAwareGatedTrainingSAE(_cfg(dtype="bfloat16"))
    assert sae.W_enc.dtype == torch.bfloat16
    assert sae.log_threshold_pos.dtype == torch.float32
    sae = sae.to(torch.float32).to(torch.bfloat16)
    assert (
        sae.log_threshold_pos.dtype == torch.float32
        and sae.log_threshold_neg.dtype == torch.float32
    )
    out = _step(sae, torch.randn(32, D_IN))
    assert out.feature_acts.dtype == torch.bfloat16
    out.loss.backward()
    assert (
        sae.log_threshold_pos.grad is not None and sae.log_threshold_pos.grad.dtype == torch.float32
    )
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path, dtype="bfloat16")
    assert loaded.W_dec.dtype == torch.bfloat16
    assert (
        loaded.threshold_pos.dtype == torch.float32 and loaded.threshold_neg.dtype == torch.float32
    )
    assert SAE.load_from_disk(tmp_path).to(torch.bfloat16).threshold_pos.dtype == torch.float32


def test_float64_sae_has_float64_thresholds() -> None:
    sae = SignAwareGatedTrainingSAE(_cfg(dtype="float64"))
    assert sae.log_threshold_pos.dtype == torch.float64


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("l1_coefficient", -0.1, ">= 0"),
        ("aux_coefficient", -1.0, ">= 0"),
        ("aux_coefficient", float("nan"), ">= 0"),
        ("l1_warm_up_steps", -5, ">= 0"),
        ("initial_threshold", 0.0, "> 0"),
        ("initial_threshold", -1e-3, "> 0"),
        ("bandwidth", 0.0, "> 0"),
    ],
)
def test_invalid_config_values_raise(field: str, value: float, allowed: str) -> None:
    with pytest.raises(ValueError, match=rf"{field} must be .*{allowed}.*got {value}"):
        _cfg(**{field: value})


def test_whitening_without_b_dec_shift_needs_one_sided() -> None:
    kw = {"normalize_activations": "covariance_whitening", "apply_b_dec_to_input": False}
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        _cfg(**kw)
    _cfg(two_sided=False, **kw)  # fine: one-sided folds like SAELens gated


def test_defaults_are_valid_at_cli_width() -> None:
    sae = SignAwareGatedTrainingSAE(SignAwareGatedTrainingSAEConfig(d_in=512, d_sae=1024))
    assert sae.cfg.aux_coefficient == 1 and sae.cfg.tie_radii and sae.cfg.two_sided
    assert sae.log_threshold_pos.exp()[0].item() == pytest.approx(sae.cfg.initial_threshold)


# --------------------------------------------------------------------------- folds


def _inference(two_sided: bool, tie_radii: bool, **kw) -> SignAwareGatedSAE:
    cfg = SignAwareGatedSAEConfig(
        d_in=D_IN, d_sae=D_SAE, two_sided=two_sided, tie_radii=tie_radii, **kw
    )
    sae = SignAwareGatedSAE(cfg)
    _randomize(sae)
    return sae


def _training(two_sided: bool, tie_radii: bool, **kw) -> SignAwareGatedTrainingSAE:
    sae = SignAwareGatedTrainingSAE(_cfg(two_sided=two_sided, tie_radii=tie_radii, **kw))
    _randomize(sae)
    return sae


FOLD_CASES = [
    pytest.param(
        make,
        two_sided,
        tie,
        id=f"{make.__name__[1:]}-{'two' if two_sided else 'one'}-{'tied' if tie else 'untied'}",
    )
    for make in (_inference, _training)
    for two_sided, tie in ((True, True), (True, False), (False, True))
]


@pytest.mark.parametrize(("make", "two_sided", "tie_radii"), FOLD_CASES)
def test_fold_W_dec_norm_preserves_outputs(make, two_sided: bool, tie_radii: bool) -> None:
    sae = make(two_sided, tie_radii)
    x = torch.randn(128, D_IN)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.3, 3.0, D_SAE)[:, None])
        f_before, y_before = sae.encode(x), sae(x)
        norms = sae.W_dec.norm(dim=-1)
        sae.fold_W_dec_norm()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
        torch.testing.assert_close(sae(x), y_before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.encode(x), f_before * norms, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("make", "two_sided", "tie_radii"), FOLD_CASES)
def test_fold_activation_norm_scaling_factor_preserves_outputs(
    make, two_sided: bool, tie_radii: bool
) -> None:
    sae = make(two_sided, tie_radii)
    x, s = torch.randn(128, D_IN), 2.5
    with torch.no_grad():
        f_scaled, y_scaled = sae.encode(x * s), sae(x * s)  # trained on s·x
        sae.fold_activation_norm_scaling_factor(s)
        torch.testing.assert_close(sae.encode(x), f_scaled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), y_scaled / s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize(("make", "two_sided", "tie_radii"), FOLD_CASES)
def test_fold_activation_whitening_preserves_outputs(
    make, two_sided: bool, tie_radii: bool, apply_b_dec_to_input: bool
) -> None:
    if two_sided and not apply_b_dec_to_input:
        sae = make(two_sided, tie_radii)
        sae.cfg.apply_b_dec_to_input = False
        with pytest.raises(ValueError, match="apply_b_dec_to_input"):
            sae.fold_activation_whitening(torch.zeros(D_IN), torch.eye(D_IN), torch.eye(D_IN))
        return
    sae = make(two_sided, tie_radii, apply_b_dec_to_input=apply_b_dec_to_input)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(D_IN, generator=g)
    M = torch.eye(D_IN) + 0.3 * torch.randn(D_IN, D_IN, generator=g)
    M_inv = torch.linalg.inv(M)
    x = torch.randn(128, D_IN, generator=g)
    with torch.no_grad():
        z = (x - mean) @ M
        f_white, z_hat = sae.encode(z), sae(z)
        sae.fold_activation_whitening(mean, M, M_inv)
        torch.testing.assert_close(sae.encode(x), f_white, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae(x), z_hat @ M_inv + mean, atol=1e-4, rtol=1e-4)
