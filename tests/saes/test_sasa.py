"""SASA (SPEC §3) beyond the architecture contract: selection, nuclear norm, AuxK, folds, I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import TrainStepInput

from sae_ext.metrics.groups import rank_at_fraction
from sae_ext.saes.sasa import (
    SASASAE,
    SASASAEConfig,
    SASATrainingSAE,
    SASATrainingSAEConfig,
    group_nuclear_norms,
    select_top_groups,
)
from sae_ext.synthetic.multidim import make_multidim_data
from sae_ext.synthetic.recovery import energy_in_subspace, units_for_energy
from sae_ext.testing import fit_on_stream

D_IN, D_SAE, R, S = 16, 48, 4, 3  # K = 12 groups


def _sae(**overrides) -> SASATrainingSAE:
    cfg = SASATrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, group_rank=R, n_active_groups=S, **overrides
    )
    sae = SASATrainingSAE(cfg)
    with torch.no_grad():  # a non-trivial, non-tied state
        sae.W_enc.data = torch.randn_like(sae.W_enc) * 0.3
        sae.b_enc.data = torch.randn_like(sae.b_enc) * 0.1
        sae.b_dec.data = torch.randn_like(sae.b_dec) * 0.1
    return sae


def _step_input(
    x: torch.Tensor, dead: torch.Tensor | None = None, nuclear: float = 1.0
) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"nuclear": nuclear},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )


def _inference_copy(sae: SASATrainingSAE, tmp_path: Path) -> SASASAE:
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, SASASAE)
    return loaded


# ---- registration and configuration ------------------------------------------------------


def test_registered_under_sasa() -> None:
    assert get_sae_class("sasa") == (SASASAE, SASASAEConfig)
    assert get_sae_training_class("sasa") == (SASATrainingSAE, SASATrainingSAEConfig)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_sae": 50, "group_rank": 4}, r"d_sae=50 must be a multiple of group_rank=4"),
        ({"group_rank": 0}, r"group_rank must be an integer >= 1; got 0"),
        ({"n_active_groups": 0}, r"n_active_groups must be an integer in \[1, 12\]; got 0"),
        ({"n_active_groups": 13}, r"n_active_groups must be an integer in \[1, 12\]; got 13"),
        (
            {"nuclear_coefficient": -0.1},
            r"nuclear_coefficient must be a finite number >= 0; got -0.1",
        ),
        ({"aux_k_coefficient": -1.0}, r"aux_k_coefficient must be a finite number >= 0; got -1.0"),
        ({"nuclear_coefficient": float("nan")}, r"nuclear_coefficient .* got nan"),
        ({"aux_k_groups": 0}, r"aux_k_groups must be an integer in \[1, 12\]; got 0"),
        ({"nuclear_warm_up_steps": -5}, r"nuclear_warm_up_steps must be an integer >= 0; got -5"),
        ({"group_rank": 2.5}, r"group_rank must be an integer >= 1; got 2.5"),
        ({"normalize_activations": "layer_norm"}, r"normalize_activations='layer_norm'"),
    ],
)
def test_config_errors_name_value_and_range(kwargs: dict, message: str) -> None:
    base = {"d_in": D_IN, "d_sae": D_SAE, "group_rank": R, "n_active_groups": S}
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SASATrainingSAEConfig(**base)


def test_inference_config_validates_too() -> None:
    with pytest.raises(ValueError, match="multiple of group_rank"):
        SASASAEConfig(d_in=D_IN, d_sae=30, group_rank=4)
    with pytest.raises(ValueError, match=r"n_active_groups must be an integer in \[1, 8\]; got 9"):
        SASASAEConfig(d_in=D_IN, d_sae=32, group_rank=4, n_active_groups=9)


def test_layer_norm_is_allowed_without_aux_k() -> None:
    cfg = SASATrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        group_rank=R,
        n_active_groups=S,
        normalize_activations="layer_norm",
        aux_k_coefficient=0.0,
    )
    assert cfg.n_groups == 12


@pytest.mark.parametrize(("d_in", "d_sae"), [(32, 128), (512, 1024)])
def test_defaults_are_valid_at_contract_and_cli_width(d_in: int, d_sae: int) -> None:
    cfg = SASATrainingSAEConfig(d_in=d_in, d_sae=d_sae)
    assert cfg.d_sae % cfg.group_rank == 0 and 1 <= cfg.n_active_groups <= cfg.n_groups


# ---- forward ------------------------------------------------------------------------------


def test_exactly_s_groups_active_per_token_and_they_are_the_top_scores() -> None:
    sae = _sae()
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        f = sae.encode(x)
        scores = sae.group_scores(x)
    active = (f.view(64, -1, R) != 0).any(-1)
    assert (active.sum(-1) == S).all()
    top = scores.topk(S, dim=-1).indices
    expected = torch.zeros_like(active).scatter_(-1, top, True)
    assert torch.equal(active, expected)
    # the kept codes are the signed codes themselves (no ReLU): negative values occur
    assert (f < 0).any()
    torch.testing.assert_close(f.view(64, -1, R)[active], sae.group_codes(x)[active])
    assert torch.equal(sae.active_groups(x).sort(-1).values, top.sort(-1).values)


def test_leading_dims_are_tokens() -> None:
    sae = _sae()
    x = torch.randn(2, 5, D_IN)
    with torch.no_grad():
        f = sae.encode(x)
        assert f.shape == (2, 5, D_SAE)
        assert ((f.view(2, 5, -1, R) != 0).any(-1).sum(-1) == S).all()
        torch.testing.assert_close(f.view(10, -1), sae.encode(x.view(10, D_IN)))
    assert sae.group_scores(x).shape == (2, 5, 12)
    assert sae.active_groups(x).shape == (2, 5, S)


def test_decoder_rows_are_unit_norm_in_the_forward() -> None:
    sae = _sae()
    with torch.no_grad():
        sae.W_dec.data *= torch.linspace(0.2, 3.0, D_SAE)[:, None]
        f = torch.zeros(1, D_SAE)
        f[0, 5] = 2.0
        out = sae.decode(f) - sae.b_dec
    torch.testing.assert_close(out.norm(), torch.tensor(2.0))
    blocks = sae.group_decoder_blocks()
    torch.testing.assert_close(blocks.norm(dim=-1), torch.ones(12, R))
    torch.testing.assert_close(sae.group_decoder_block(1), blocks[1])
    torch.testing.assert_close(
        sae.group_decoder_block(1),
        sae.W_dec[R : 2 * R] / sae.W_dec[R : 2 * R].norm(dim=-1, keepdim=True),
    )
    with pytest.raises(ValueError, match=r"group must be an integer in \[0, 11\]; got 12"):
        sae.group_decoder_block(12)


def test_select_top_groups_matches_hand_example() -> None:
    codes = torch.tensor([[3.0, 0.0, 1.0, 1.0, -0.5, 2.5]])  # r = 2: norms 3, 1.41, 2.55
    out = select_top_groups(codes, group_rank=2, n_active_groups=2)
    assert out.tolist() == [[3.0, 0.0, 0.0, 0.0, -0.5, 2.5]]


# ---- nuclear norm -------------------------------------------------------------------------


def test_nuclear_norm_value_matches_torch() -> None:
    blocks = torch.randn(6, 4, 10, dtype=torch.float64)
    torch.testing.assert_close(
        group_nuclear_norms(blocks), torch.linalg.matrix_norm(blocks, ord="nuc")
    )


def test_nuclear_norm_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(0)
    # singular values well separated from each other and from zero
    u, _ = torch.linalg.qr(torch.randn(3, 4, 4, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 9, 4, generator=g, dtype=torch.float64))
    sigma = torch.tensor([2.0, 1.3, 0.8, 0.4], dtype=torch.float64)
    blocks = (u * sigma) @ v.transpose(-1, -2)
    blocks.requires_grad_(True)
    assert torch.autograd.gradcheck(group_nuclear_norms, (blocks,), eps=1e-6, atol=1e-6)


def test_nuclear_norm_gradient_is_the_polar_factor() -> None:
    block = torch.randn(1, 4, 7, dtype=torch.float64, requires_grad=True)
    group_nuclear_norms(block).sum().backward()
    u, _, vh = torch.linalg.svd(block.detach()[0], full_matrices=False)
    torch.testing.assert_close(block.grad[0], u @ vh)


def test_nuclear_norm_gradient_finite_at_rank_deficiency() -> None:
    # four identical rows (rank 1) and more rows than dimensions (r > d): the subgradient is finite
    rows = torch.randn(1, 7, dtype=torch.float64).repeat(4, 1)[None]
    wide = torch.randn(1, 5, 3, dtype=torch.float64)
    for block in (rows, wide):
        block = block.clone().requires_grad_(True)
        value = group_nuclear_norms(block)
        value.sum().backward()
        assert torch.isfinite(block.grad).all()
        assert block.grad.norm() <= block.shape[1] ** 0.5 + 1e-6  # ‖U Vᵀ‖_F ≤ sqrt(rank)
        torch.testing.assert_close(
            value, torch.linalg.matrix_norm(block.detach(), ord="nuc"), atol=1e-5, rtol=0
        )


def test_nuclear_loss_is_coefficient_times_mean_nuclear_norm_of_unit_blocks() -> None:
    sae = _sae(nuclear_coefficient=0.7)
    with torch.no_grad():
        sae.W_dec.data *= torch.linspace(0.5, 2.0, D_SAE)[:, None]
    out = sae.training_forward_pass(_step_input(torch.randn(8, D_IN), nuclear=0.7))
    unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    nuc = torch.linalg.matrix_norm(unit.view(12, R, D_IN).double(), ord="nuc").mean()
    torch.testing.assert_close(out.losses["nuclear_loss"].double(), 0.7 * nuc, rtol=1e-5, atol=0)
    # with unit rows the nuclear norm lies in [sqrt(r), r]
    assert R**0.5 - 1e-5 <= nuc <= R + 1e-5


# ---- stable rank ---------------------------------------------------------------------------


def test_group_stable_rank_in_one_to_r_and_exact_at_the_extremes() -> None:
    sae = _sae()
    sr = sae.group_stable_rank()
    assert sr.shape == (12,) and (sr >= 1 - 1e-9).all() and (sr <= R + 1e-9).all()
    with torch.no_grad():
        sae.W_dec.data[0:R] = (
            torch.randn(1, D_IN).repeat(R, 1) * torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None]
        )
        sae.W_dec.data[R : 2 * R] = torch.eye(D_IN)[:R] * 5.0
    sr = sae.group_stable_rank()
    torch.testing.assert_close(sr[:2], torch.tensor([1.0, float(R)], dtype=torch.float64))
    assert sae.group_rank90()[:2].tolist() == [1, R]


# ---- training step ------------------------------------------------------------------------


def test_training_step_renormalises_decoder_without_changing_the_function() -> None:
    sae = _sae()
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        sae.W_dec.data *= torch.linspace(0.5, 2.0, D_SAE)[:, None]
        before = sae(x)
    out = sae.training_forward_pass(_step_input(x))
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(out.sae_out, before, atol=1e-5, rtol=1e-5)


def test_decoder_gradient_is_tangent_to_unit_rows() -> None:
    sae = _sae(nuclear_coefficient=0.5)
    out = sae.training_forward_pass(_step_input(torch.randn(32, D_IN), nuclear=0.5))
    out.loss.backward()
    radial = (sae.W_dec.grad * sae.W_dec.detach()).sum(-1)
    torch.testing.assert_close(radial, torch.zeros(D_SAE), atol=1e-6, rtol=0)


def test_metrics_report_stable_rank_and_dead_groups() -> None:
    sae = _sae()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[: 3 * R] = True  # groups 0-2 dead
    dead[3 * R] = True  # one column of group 3: the group is alive
    out = sae.training_forward_pass(_step_input(torch.randn(16, D_IN), dead=dead))
    metrics = {k: (v() if callable(v) else v) for k, v in out.metrics.items()}
    assert float(metrics["dead_groups_fraction"]) == pytest.approx(3 / 12)
    assert 1.0 <= float(metrics["mean_group_stable_rank"]) <= R
    assert 1.0 <= float(metrics["mean_group_rank90"]) <= R
    assert float(metrics["active_groups_per_token"]) == S


def test_aux_k_gradient_flows_only_through_dead_groups() -> None:
    sae = _sae(aux_k_coefficient=1.0, aux_k_groups=2)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[0 : 3 * R] = True  # groups 0, 1, 2 dead
    dead[5 * R : 5 * R + 2] = True  # half of group 5: alive
    x = torch.randn(32, D_IN)
    feature_acts, codes = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts)
    aux = sae.calculate_group_aux_loss(
        sae_in=x, sae_out=sae_out, hidden_pre=codes, dead_neuron_mask=dead
    )
    assert aux > 0
    aux.backward()
    dead_cols = torch.arange(D_SAE) < 3 * R
    assert (sae.W_enc.grad[:, ~dead_cols] == 0).all()
    assert (sae.b_enc.grad[~dead_cols] == 0).all()
    assert (sae.W_dec.grad[~dead_cols] == 0).all()
    assert sae.W_enc.grad[:, dead_cols].abs().sum() > 0


def test_aux_k_scale_and_zero_without_dead_groups() -> None:
    sae = _sae(aux_k_coefficient=2.0, aux_k_groups=4)
    x = torch.randn(32, D_IN)
    feature_acts, codes = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts)
    none_dead = sae.calculate_group_aux_loss(
        x, sae_out, codes, torch.zeros(D_SAE, dtype=torch.bool)
    )
    assert none_dead.item() == 0.0
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[: 2 * R] = True  # 2 dead groups < k_aux = 4: both used, scale 2/4
    aux = sae.calculate_group_aux_loss(x, sae_out, codes, dead)
    recons = codes.detach().clone()
    recons[:, 2 * R :] = 0
    expected = (
        ((recons @ sae.decoder_directions().detach() - (x - sae_out.detach())) ** 2).sum(-1).mean()
    )
    torch.testing.assert_close(aux.detach(), 2.0 * 0.5 * expected)


def test_nuclear_penalty_lowers_stable_rank_in_training() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, D_IN, generator=g)

    def stream():
        while True:
            yield x[torch.randint(0, 2048, (128,), generator=g)]

    ranks = {}
    for lam in (0.0, 5.0):
        torch.manual_seed(0)
        sae = SASATrainingSAE(
            SASATrainingSAEConfig(
                d_in=D_IN, d_sae=D_SAE, group_rank=R, n_active_groups=S, nuclear_coefficient=lam
            )
        )
        fit_on_stream(sae, stream(), steps=60, batch_size=128, lr=1e-2)
        ranks[lam] = sae.group_stable_rank().mean().item()
    assert ranks[5.0] < ranks[0.0] - 0.5, ranks


# ---- folds ----------------------------------------------------------------------------------


def test_fold_W_dec_norm_preserves_outputs_and_selection(tmp_path: Path) -> None:
    loaded = _inference_copy(_sae(), tmp_path)
    x = torch.randn(128, D_IN)
    with torch.no_grad():
        # different norms inside every group, so the fold changes the raw encoder codes
        loaded.W_dec.data *= (torch.rand(D_SAE) * 2.5 + 0.25)[:, None]
        out, acts, sel = loaded(x), loaded.encode(x), loaded.active_groups(x)
        loaded.fold_W_dec_norm()
        torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(D_SAE))
        torch.testing.assert_close(loaded(x), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.encode(x), acts, atol=1e-5, rtol=1e-5)
        assert torch.equal(loaded.active_groups(x), sel)


def test_training_sae_fold_W_dec_norm_preserves_outputs() -> None:
    sae = _sae()
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        sae.W_dec.data *= torch.linspace(0.3, 2.0, D_SAE)[:, None]
        before = sae(x)
        sae.fold_W_dec_norm()
        torch.testing.assert_close(sae(x), before, atol=1e-5, rtol=1e-5)


def test_fold_activation_norm_scaling_factor() -> None:
    sae = _sae()
    x = torch.randn(64, D_IN)
    c = 3.5
    with torch.no_grad():
        expected = sae(c * x) / c
        sae.fold_activation_norm_scaling_factor(c)
        torch.testing.assert_close(sae(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["training", "inference"])
def test_fold_activation_whitening(which: str, tmp_path: Path) -> None:
    sae: SAE = _sae()
    if which == "inference":
        sae = _inference_copy(sae, tmp_path)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(D_IN, generator=g)
    m = torch.randn(D_IN, D_IN, generator=g) / D_IN**0.5 + torch.eye(D_IN)
    m_inv = torch.linalg.inv(m)
    x = torch.randn(64, D_IN, generator=g)
    with torch.no_grad():
        expected = sae((x - mean) @ m) @ m_inv + mean
        sae.fold_activation_whitening(mean, m, m_inv)
        assert sae.cfg.rescale_acts_by_decoder_norm is False
        torch.testing.assert_close(sae(x), expected, atol=1e-4, rtol=1e-4)
        with pytest.raises(NotImplementedError, match="group selection"):
            sae.fold_W_dec_norm()


# ---- save / load ----------------------------------------------------------------------------


def test_save_inference_and_load_equal_training_sae(tmp_path: Path) -> None:
    sae = _sae()
    with torch.no_grad():
        sae.W_dec.data *= torch.linspace(0.5, 2.0, D_SAE)[:, None]  # the save folds these norms
    x = torch.randn(64, D_IN)
    loaded = _inference_copy(sae, tmp_path)
    assert not isinstance(loaded, TrainingSAE)
    assert (loaded.cfg.group_rank, loaded.cfg.n_active_groups) == (R, S)
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(D_SAE))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            loaded.group_scores(x), sae.group_scores(x), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(loaded.group_decoder_blocks(), sae.group_decoder_blocks())


def test_training_checkpoint_round_trip(tmp_path: Path) -> None:
    sae = _sae(nuclear_coefficient=0.25, aux_k_groups=3)
    sae.save_model(tmp_path)
    again = TrainingSAE.load_from_disk(tmp_path)
    assert isinstance(again, SASATrainingSAE)
    assert again.cfg.nuclear_coefficient == 0.25 and again.cfg.aux_k_groups == 3
    for name, p in sae.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], p)


# ---- behaviour on multi-dimensional features -------------------------------------------------


def test_one_group_per_feature_reconstructs_circles_and_spheres_exactly() -> None:
    """SPEC §3's premise with r ≥ d_i: one group per multi-dimensional feature suffices.

    Hand-built SASA: group 0 spans a circle, group 1 a sphere (encoder = decoder transpose),
    groups 2-3 point elsewhere with zero encoders. Every sample is reconstructed exactly, each
    feature's energy sits in its own group, and that group writes a d_i-dimensional signal.
    """
    dims = [2, 3]
    torch.manual_seed(0)
    data = make_multidim_data(dims, 8, firing_probability=0.5, batch_size=512, seed=0)
    sample = data.sample()
    b_circle, b_sphere = sample.bases
    rest = torch.linalg.svd(torch.cat(sample.bases), full_matrices=True)[2][5:]  # ⊥ both
    sae = SASASAE(SASASAEConfig(d_in=8, d_sae=12, group_rank=3, n_active_groups=2))
    with torch.no_grad():
        sae.W_dec.data = torch.cat([b_circle, b_circle[:1], b_sphere, rest, rest])
        enc = torch.zeros(8, 12)
        enc[:, 0:2] = b_circle.T
        enc[:, 3:6] = b_sphere.T
        sae.W_enc.data = enc
        sae.b_enc.data.zero_()
        sae.b_dec.data.zero_()
        f = sae.encode(sample.activations)
        torch.testing.assert_close(sae.decode(f), sample.activations, atol=1e-5, rtol=0)
    codes, blocks = sae.group_acts(f), sae.group_decoder_blocks()
    for i, basis in enumerate(sample.bases):
        fires = sample.magnitudes[:, i] > 0
        energy = energy_in_subspace(codes[fires], blocks, basis)
        assert units_for_energy(energy) == 1 and int(energy.argmax()) == i
        written = codes[fires][:, i] @ blocks[i]
        assert int(rank_at_fraction(torch.linalg.svdvals(written.double()).pow(2))) == dims[i]
