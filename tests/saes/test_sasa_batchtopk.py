"""SASA with batch-level group selection (SPEC §3): ``sasa_batchtopk`` / ``sasa_jumprelu``,
beyond the architecture contract: selection, running threshold, save/load, folds, dtypes,
and one group per multi-dimensional feature on tokens with more than s features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from sae_ext.evaluation_spec import evaluation_spec
from sae_ext.registry import PLUGIN_TRAINING_ARCHITECTURES
from sae_ext.saes.sasa import SASATrainingSAE, group_norms
from sae_ext.saes.sasa_batchtopk import (
    SASABatchTopKTrainingSAE,
    SASABatchTopKTrainingSAEConfig,
    SASAJumpReLUSAE,
    SASAJumpReLUSAEConfig,
    batch_top_groups_mask,
)
from sae_ext.synthetic.multidim import make_multidim_data
from sae_ext.synthetic.recovery import energy_in_subspace, units_for_energy
from sae_ext.testing import fit_on_stream

D_IN, D_SAE, R, S = 16, 48, 4, 3  # K = 12 groups


def _sae(**overrides) -> SASABatchTopKTrainingSAE:
    cfg = SASABatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, group_rank=R, n_active_groups=S, **overrides
    )
    sae = SASABatchTopKTrainingSAE(cfg)
    with torch.no_grad():  # a non-trivial, non-tied state
        sae.W_enc.data = torch.randn_like(sae.W_enc) * 0.3
        sae.b_enc.data = torch.randn_like(sae.b_enc) * 0.1
        sae.b_dec.data = torch.randn_like(sae.b_dec) * 0.1
    return sae


def _step_input(x: torch.Tensor, dead: torch.Tensor | None = None) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"nuclear": 1.0},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )


def _inference_copy(sae: SASABatchTopKTrainingSAE, tmp_path: Path) -> SASAJumpReLUSAE:
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, SASAJumpReLUSAE)
    return loaded


# ---- registration and configuration ------------------------------------------------------


def test_registered_and_saved_as_sasa_jumprelu() -> None:
    assert get_sae_class("sasa_jumprelu") == (SASAJumpReLUSAE, SASAJumpReLUSAEConfig)
    assert get_sae_training_class("sasa_batchtopk") == (
        SASABatchTopKTrainingSAE,
        SASABatchTopKTrainingSAEConfig,
    )
    assert PLUGIN_TRAINING_ARCHITECTURES["sasa_batchtopk"] == "sasa_jumprelu"
    assert issubclass(SASABatchTopKTrainingSAE, SASATrainingSAE)  # same decoder/nuclear/AuxK


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk_threshold_lr": 0.0}, r"topk_threshold_lr must be a number in \(0, 1\]; got 0.0"),
        ({"topk_threshold_lr": 1.5}, r"topk_threshold_lr must be a number in \(0, 1\]; got 1.5"),
        ({"topk_threshold_lr": float("nan")}, r"topk_threshold_lr .* got nan"),
        ({"topk_threshold_lr": True}, r"topk_threshold_lr .* got True"),
        ({"d_sae": 50}, r"d_sae=50 must be a multiple of group_rank=4"),
        ({"n_active_groups": 13}, r"n_active_groups must be an integer in \[1, 12\]; got 13"),
        ({"nuclear_coefficient": -0.1}, r"nuclear_coefficient must be a finite number >= 0"),
        ({"aux_k_groups": 0}, r"aux_k_groups must be an integer in \[1, 12\]; got 0"),
    ],
)
def test_config_errors_name_value_and_range(kwargs: dict, message: str) -> None:
    base = {"d_in": D_IN, "d_sae": D_SAE, "group_rank": R, "n_active_groups": S}
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SASABatchTopKTrainingSAEConfig(**base)


def test_inference_config_validates_too() -> None:
    with pytest.raises(ValueError, match="multiple of group_rank"):
        SASAJumpReLUSAEConfig(d_in=D_IN, d_sae=30, group_rank=4)


# ---- batch selection ----------------------------------------------------------------------


def test_batch_top_groups_mask_hand_example() -> None:
    scores = torch.tensor([[5.0, 1.0, 0.5], [4.0, 3.0, 2.0]])  # s = 1, B = 2: keep 2 of 6
    assert batch_top_groups_mask(scores, 1).tolist() == [[True, False, False], [True, False, False]]
    # s = 2: 4 of 6 — the second token gets all three groups, the first only one
    assert batch_top_groups_mask(scores, 2).tolist() == [[True, False, False], [True, True, True]]


def test_s_times_b_groups_kept_and_they_are_the_batch_top_scores() -> None:
    sae = _sae()
    x = torch.randn(64, D_IN) * torch.linspace(0.2, 3.0, 64)[:, None]  # tokens differ in need
    with torch.no_grad():
        f = sae.encode(x)
        scores = sae.group_scores(x)
    active = (sae.group_acts(f) != 0).any(-1)
    assert int(active.sum()) == S * 64
    per_token = active.sum(-1)
    assert per_token.min() < S < per_token.max()  # not a per-token cap
    assert scores[active].min() >= scores[~active].max()
    assert torch.equal(sae.active_group_mask(x), active)
    # the kept codes are the signed codes themselves
    torch.testing.assert_close(sae.group_acts(f)[active], sae.group_codes(x)[active])
    with pytest.raises(NotImplementedError, match="active_group_mask"):
        sae.active_groups(x)


def test_leading_dims_select_over_all_tokens() -> None:
    sae = _sae()
    x = torch.randn(2, 5, D_IN)
    with torch.no_grad():
        f = sae.encode(x)
        assert f.shape == (2, 5, D_SAE)
        torch.testing.assert_close(f.reshape(10, -1), sae.encode(x.reshape(10, D_IN)))
        assert int((sae.group_acts(f) != 0).any(-1).sum()) == S * 10


# ---- running threshold -------------------------------------------------------------------


def test_threshold_moves_towards_the_smallest_kept_score() -> None:
    sae = _sae(topk_threshold_lr=0.25)
    x = torch.randn(32, D_IN)
    out = sae.training_forward_pass(_step_input(x))
    kept = group_norms(out.feature_acts.detach().double(), R)
    expected = 0.25 * kept[kept > 0].min()
    torch.testing.assert_close(sae.topk_threshold, expected)
    assert sae.topk_threshold.dtype == torch.float64
    assert out.metrics["topk_threshold"] is sae.topk_threshold
    out2 = sae.training_forward_pass(_step_input(x))
    kept2 = group_norms(out2.feature_acts.detach().double(), R)
    torch.testing.assert_close(sae.topk_threshold, 0.75 * expected + 0.25 * kept2[kept2 > 0].min())
    before = sae.topk_threshold.clone()
    sae.update_topk_threshold(torch.zeros(8, D_SAE))  # nothing kept: θ stays
    torch.testing.assert_close(sae.topk_threshold, before)


def test_group_metrics_count_the_mean_groups_per_token() -> None:
    sae = _sae()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[: 2 * R] = True
    out = sae.training_forward_pass(_step_input(torch.randn(16, D_IN), dead=dead))
    metrics = {k: (v() if callable(v) else v) for k, v in out.metrics.items()}
    assert float(metrics["active_groups_per_token"]) == S
    assert float(metrics["dead_groups_fraction"]) == pytest.approx(2 / 12)
    assert out.losses["auxiliary_reconstruction_loss"] > 0  # SASA's group AuxK runs


# ---- save / load, inference ---------------------------------------------------------------


def test_saved_sae_keeps_every_group_above_the_learned_threshold(tmp_path: Path) -> None:
    sae = _sae()
    with torch.no_grad():
        sae.W_dec.data *= torch.linspace(0.5, 2.0, D_SAE)[:, None]  # the save folds these norms
        sae.topk_threshold.fill_(1.3)
    loaded = _inference_copy(sae, tmp_path)
    assert not isinstance(loaded, TrainingSAE)
    assert loaded.cfg.architecture() == "sasa_jumprelu"
    assert (loaded.cfg.group_rank, loaded.cfg.n_active_groups) == (R, S)
    torch.testing.assert_close(loaded.threshold, torch.full((12,), 1.3))
    torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(D_SAE))
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        scores = loaded.group_scores(x)
        torch.testing.assert_close(scores, sae.group_scores(x), atol=1e-5, rtol=1e-5)
        f = loaded.encode(x)
        active = (loaded.group_acts(f) != 0).any(-1)
        assert torch.equal(active, scores > 1.3) and torch.equal(
            loaded.active_group_mask(x), active
        )
        torch.testing.assert_close(loaded.group_acts(f)[active], loaded.group_codes(x)[active])
        # with the batch's own smallest kept score as θ the two selections agree
        kept = sae.active_group_mask(x)
        loaded.threshold.data.fill_(float(scores[~kept].max()))
        assert torch.equal(loaded.active_group_mask(x), kept)
        torch.testing.assert_close(loaded(x), sae(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="active_group_mask"):
        loaded.active_groups(x)
    spec = evaluation_spec(loaded)
    assert spec.group_rank == R and spec.group_blocks.shape == (12, R, D_IN)


def test_threshold_stays_float32_in_bf16(tmp_path: Path) -> None:
    sae = _sae()
    with torch.no_grad():
        sae.topk_threshold.fill_(0.123456789)
    assert sae.to(torch.bfloat16).topk_threshold.dtype == torch.float64
    sae = sae.to(torch.float32)
    loaded = _inference_copy(sae, tmp_path)
    assert loaded.threshold.dtype == torch.float32
    bf16 = loaded.to(torch.bfloat16)
    assert bf16.W_dec.dtype == torch.bfloat16 and bf16.threshold.dtype == torch.float32
    theta = float(bf16.threshold.detach()[0])
    assert theta == pytest.approx(0.123456789, rel=1e-7)  # not bf16-rounded
    with torch.no_grad():
        assert bf16.encode(torch.randn(4, D_IN, dtype=torch.bfloat16)).dtype == torch.bfloat16
    built = SASAJumpReLUSAE(
        SASAJumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, group_rank=R, dtype="bfloat16")
    )
    assert built.threshold.dtype == torch.float32


def test_training_checkpoint_round_trip(tmp_path: Path) -> None:
    sae = _sae(topk_threshold_lr=0.2)
    with torch.no_grad():
        sae.topk_threshold.fill_(0.7)
    sae.save_model(tmp_path)
    again = TrainingSAE.load_from_disk(tmp_path)
    assert isinstance(again, SASABatchTopKTrainingSAE) and again.cfg.topk_threshold_lr == 0.2
    for name, p in sae.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], p)


# ---- folds ----------------------------------------------------------------------------------


def test_fold_W_dec_norm_preserves_outputs_and_selection(tmp_path: Path) -> None:
    sae = _sae()
    with torch.no_grad():
        sae.topk_threshold.fill_(0.8)
    loaded = _inference_copy(sae, tmp_path)
    x = torch.randn(128, D_IN)
    with torch.no_grad():
        loaded.W_dec.data *= (torch.rand(D_SAE) * 2.5 + 0.25)[:, None]
        out, acts, sel = loaded(x), loaded.encode(x), loaded.active_group_mask(x)
        assert 0 < int(sel.sum()) < sel.numel()
        loaded.fold_W_dec_norm()
        torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(D_SAE))
        torch.testing.assert_close(loaded(x), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.encode(x), acts, atol=1e-5, rtol=1e-5)
        assert torch.equal(loaded.active_group_mask(x), sel)


@pytest.mark.parametrize("which", ["training", "inference"])
def test_fold_activation_norm_scaling_factor_scales_the_threshold(
    which: str, tmp_path: Path
) -> None:
    sae: SAE = _sae()
    with torch.no_grad():
        sae.topk_threshold.fill_(0.9)
    if which == "inference":
        sae = _inference_copy(sae, tmp_path)
    x = torch.randn(64, D_IN)
    c = 3.5
    with torch.no_grad():
        expected, expected_sel = sae(c * x) / c, sae.active_group_mask(c * x)
        sae.fold_activation_norm_scaling_factor(c)
        torch.testing.assert_close(sae(x), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(sae.active_group_mask(x), expected_sel)
    theta = sae.topk_threshold if which == "training" else sae.threshold
    torch.testing.assert_close(theta.double(), torch.full_like(theta, 0.9 / c).double())


def test_fold_activation_whitening_keeps_the_selection(tmp_path: Path) -> None:
    sae = _sae()
    with torch.no_grad():
        sae.topk_threshold.fill_(0.5)
    loaded = _inference_copy(sae, tmp_path)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(D_IN, generator=g)
    m = torch.randn(D_IN, D_IN, generator=g) / D_IN**0.5 + torch.eye(D_IN)
    m_inv = torch.linalg.inv(m)
    x = torch.randn(64, D_IN, generator=g)
    with torch.no_grad():
        expected = loaded((x - mean) @ m) @ m_inv + mean
        loaded.fold_activation_whitening(mean, m, m_inv)
        torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=1e-4)


# ---- behaviour on multi-dimensional features -------------------------------------------------


def _r2(y: torch.Tensor, x: torch.Tensor) -> float:
    return float(1 - (y - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_one_group_per_circle_or_sphere_and_topk_r2_when_tokens_exceed_s(tmp_path: Path) -> None:
    """Issue 18 item 4: circles and spheres, a third of the tokens carry more than s features.

    With the same mean active columns as TopK (s·r = k), batch selection reaches TopK's R²
    (within 0.02), in training and in the saved per-token ``sasa_jumprelu`` SAE, while one
    group carries each feature (mean groups for 90 % of a feature's energy ≤ 1.5).
    """
    dims, d_in, r, s, steps = [2] * 6 + [3] * 4, 32, 3, 2, 1000

    def data():
        torch.manual_seed(0)
        return make_multidim_data(
            dims, d_in, firing_probability=0.2, std_magnitude=0.2, batch_size=256, seed=0
        )

    test = data().sample(4096)
    x = test.activations
    assert float(((test.magnitudes > 0).sum(-1) > s).double().mean()) > 0.25
    lam = 0.02 * float(x.pow(2).sum(-1).mean())  # λ_nuc relative to E‖x‖² (SASA docstring)
    torch.manual_seed(1)
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=16 * r, k=s * r))
    fit_on_stream(topk, data(), steps, 256)
    torch.manual_seed(1)
    sae = SASABatchTopKTrainingSAE(
        SASABatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=16 * r, group_rank=r, n_active_groups=s, nuclear_coefficient=lam
        )
    )
    fit_on_stream(sae, data(), steps, 256)
    with torch.no_grad():
        r2_topk = _r2(topk(x), x)
        f = sae.encode(x)
        assert float((f != 0).sum(-1).double().mean()) == s * r  # TopK's active columns
        r2_batch = _r2(sae.decode(f), x)
        loaded = _inference_copy(sae, tmp_path)
        f_inf = loaded.encode(x)
        columns_inf = float((f_inf != 0).sum(-1).double().mean())
        r2_inf = _r2(loaded.decode(f_inf), x)
    assert r2_batch >= r2_topk - 0.02, (r2_batch, r2_topk)
    assert abs(columns_inf - s * r) <= 0.1 * s * r, columns_inf
    assert r2_inf >= r2_topk - 0.02, (r2_inf, r2_topk)
    codes, blocks = sae.group_acts(f), sae.group_decoder_blocks().detach()
    units = [
        units_for_energy(energy_in_subspace(codes[test.magnitudes[:, i] > 0], blocks, basis))
        for i, basis in enumerate(test.bases)
    ]
    assert min(units) >= 1 and sum(units) / len(units) <= 1.5, units
