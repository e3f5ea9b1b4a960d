"""Scaffold v2 (SPEC §2): PCA init with b_dec at the batch mean, ``scaffold_tied`` and
``scaffold_lr_scale``; save / load / fold keep the outputs for every option."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainStepInput

from sae_ext.metrics.pca import top_pca_basis
from sae_ext.saes.scaffold import ScaffoldJumpReLUSAE
from sae_ext.synthetic.lowrank import SparsePlusLowRank
from sae_ext.testing import fit_on_stream, train_step_input

ARCHS = ["scaffold_batchtopk", "scaffold_matryoshka_batchtopk"]
D_IN, D_SAE, R, K = 32, 128, 4, 4
OPTIONS = [
    {},
    {"scaffold_tied": True},
    {"scaffold_lr_scale": 0.1},
    {"scaffold_tied": True, "scaffold_lr_scale": 3.0},
    {"scaffold_encoder_input": "full", "scaffold_lr_scale": 0.5},
]
OPTION_IDS = ["default", "tied", "lr0.1", "tied+lr3", "full+lr0.5"]


def _make(arch: str, **kw) -> TrainingSAE:
    cls, cfg_cls = get_sae_training_class(arch)
    kw.setdefault("scaffold_rank", R)
    kw.setdefault("k", K)
    return cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw))


def _step(x: torch.Tensor) -> TrainStepInput:
    return train_step_input(x, D_SAE)


def _data(seed: int = 0, **kw) -> SparsePlusLowRank:
    return SparsePlusLowRank(D_IN, 96, R, dense_std=3.0, orthogonalize=False, seed=seed, **kw)


def _train(sae: TrainingSAE, steps: int, seed: int = 0, batch: int = 256) -> TrainingSAE:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit_on_stream(
            sae, _data(seed, bias=4.0).batches(batch), steps, batch,
            dead_feature_window=50, feature_sampling_window=100,
        )
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("value", [0, 0.0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_lr_scale_is_one_clear_error(arch: str, value) -> None:
    with pytest.raises(ValueError, match=r"scaffold_lr_scale must be a finite number > 0.*got"):
        _make(arch, scaffold_lr_scale=value)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_bad_tied_is_one_clear_error(arch: str, value) -> None:
    with pytest.raises(ValueError, match=r"scaffold_tied must be True or False; got"):
        _make(arch, scaffold_tied=value)


def test_training_only_options_do_not_reach_the_inference_config() -> None:
    cfg = _make("scaffold_batchtopk", scaffold_tied=True, scaffold_lr_scale=0.1).cfg
    inf = cfg.get_inference_sae_cfg_dict()
    assert "scaffold_tied" not in inf and "scaffold_lr_scale" not in inf
    assert inf["scaffold_encoder_input"] == "residual"


# --------------------------------------------------------------------------- PCA init


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_pca_init_makes_s_plus_b_dec_the_pca_reconstruction(arch: str, apply_b_dec_to_input: bool, opts) -> None:
    """At init, ``s + b_dec = μ + (x − μ) Q Qᵀ`` with μ the batch mean and Q its top-r directions
    (and ``b_dec = μ`` when b_dec is subtracted from the input: s is then the PCA reconstruction
    of the centred input)."""
    sae = _make(arch, apply_b_dec_to_input=apply_b_dec_to_input, dtype="float64", **opts)
    first = _data(bias=6.0).sample(512).activations.double()
    with torch.no_grad():
        sae.training_forward_pass(_step(first))
    pca = top_pca_basis(first, R)
    mu, q = pca.mean, pca.basis
    expected = mu + (first - mu) @ q @ q.T
    torch.testing.assert_close(sae.scaffold(first) + sae.b_dec, expected)
    if apply_b_dec_to_input:
        torch.testing.assert_close(sae.b_dec.detach(), mu)
        torch.testing.assert_close(sae.scaffold(first), (first - mu) @ q @ q.T)
    v, u = sae.scaffold_frames()
    torch.testing.assert_close(u.detach(), v.detach().T)


def test_pca_init_on_a_batch_with_an_outlier_token_is_dominated_by_it() -> None:
    """Why SPEC §8 keeps special tokens out of the init: one huge repeated token takes the top
    direction; the same batch without it does not."""
    gen = _data(outlier_prob=0.01, outlier_norm=200.0)
    sample = gen.sample(1024)
    assert sample.outlier_mask.any()
    for keep_outliers in (True, False):
        sae = _make("scaffold_batchtopk")
        x = sample.activations if keep_outliers else sample.activations[~sample.outlier_mask]
        with torch.no_grad():
            sae.training_forward_pass(_step(x))
        top = sae.scaffold_frames()[0][:, 0].detach()
        cos = (top @ gen.outlier_vector / gen.outlier_vector.norm()).abs().item()
        assert (cos > 0.9) if keep_outliers else (cos < 0.5), (keep_outliers, cos)


# --------------------------------------------------------------------------- tied


def test_tied_scaffold_is_orthonormal_and_tied_after_every_optimiser_step() -> None:
    sae = _make("scaffold_batchtopk", scaffold_tied=True, scaffold_lr_scale=2.0, dtype="float64")
    gen = _data(bias=3.0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    v0 = None
    for _ in range(5):
        out = sae.training_forward_pass(_step(gen.sample(128).activations.double()))
        if v0 is None:
            v0 = sae.scaffold_frames()[0].detach().clone()
        out.loss.backward()
        assert sae.scaffold_U.grad is None  # U = Vᵀ: the gradient goes to V only
        assert sae.scaffold_V.grad is not None
        opt.step()
        opt.zero_grad()
        v, u = (t.detach() for t in sae.scaffold_frames())
        torch.testing.assert_close(v.T @ v, torch.eye(R, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(u, v.T, atol=1e-12, rtol=0)
    assert v0 is not None and not torch.allclose(v, v0)  # and it did train


def test_untied_scaffold_is_not_retracted() -> None:
    sae = _make("scaffold_batchtopk", dtype="float64")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    gen = _data(bias=3.0)
    for _ in range(3):
        sae.training_forward_pass(_step(gen.sample(128).activations.double())).loss.backward()
        opt.step()
        opt.zero_grad()
    v, u = (t.detach() for t in sae.scaffold_frames())
    assert not torch.allclose(u, v.T, atol=1e-6)


def test_the_step_hook_ignores_other_optimisers_and_copies() -> None:
    sae = _make("scaffold_batchtopk", scaffold_tied=True)
    sae.training_forward_pass(_step(_data().sample(128).activations))  # registers the hook
    clone = copy.deepcopy(sae)
    with torch.no_grad():
        sae.scaffold_V.mul_(2.0)  # un-orthonormal on purpose
    other = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD([*other.parameters(), *clone.parameters()], lr=0.1)
    opt.step()  # no gradients: a step of an optimiser not holding ``sae``'s V
    assert torch.allclose(sae.scaffold_V.detach().T @ sae.scaffold_V.detach(), 4 * torch.eye(R), atol=1e-5)


# --------------------------------------------------------------------------- lr scale


@pytest.mark.parametrize("tied", [False, True])
def test_lr_scale_scales_the_effective_scaffold_update(tied: bool) -> None:
    """One SAELens trainer step from the same effective weights: the scaffold moves by c times
    as much (Adam's first step is ±lr per stored entry, and the stored entries are V / c), the
    rest of the SAE moves exactly as with c = 1."""
    c = 0.1
    moved = {}
    for scale in (1.0, c):
        torch.manual_seed(0)
        sae = _make("scaffold_batchtopk", scaffold_lr_scale=scale, scaffold_tied=tied, dtype="float64")
        x = _data(bias=2.0).sample(256).activations.double()
        with torch.no_grad():
            sae.training_forward_pass(_step(x))  # PCA init: the same effective frame for both
        v0, u0 = (t.detach().clone() for t in sae.scaffold_frames())
        w0 = sae.W_enc.detach().clone()
        fit_on_stream(sae, iter([x.float()] * 2), 1, 256, lr=1e-3)
        v1, u1 = (t.detach() for t in sae.scaffold_frames())
        moved[scale] = (v1 - v0, u1 - u0, sae.W_enc.detach() - w0)
    dv1, du1, dw1 = moved[1.0]
    dvc, duc, dwc = moved[c]
    assert dv1.abs().max() > 1e-5
    torch.testing.assert_close(dwc, dw1, rtol=1e-4, atol=1e-9)
    if tied:  # after the retraction: a rotation c times smaller, to first order
        ratio = dvc.norm() / dv1.norm()
        assert ratio.item() == pytest.approx(c, rel=0.05)
    else:
        # entrywise up to Adam's eps (1e-8) acting on the few near-zero gradient entries
        torch.testing.assert_close(dvc, c * dv1, rtol=1e-3, atol=0.02 * c * 1e-3)
        torch.testing.assert_close(duc, c * du1, rtol=1e-3, atol=0.02 * c * 1e-3)
        assert (dvc.norm() / dv1.norm()).item() == pytest.approx(c, rel=1e-3)


# --------------------------------------------------------------------------- save / load / fold


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_save_load_keeps_the_scaffold_and_outputs(arch: str, opts, tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = _train(_make(arch, **opts), steps=30)
    if opts.get("scaffold_tied"):  # SAELens's Adam steps ran the retraction, the last one too
        v, u = (t.detach() for t in sae.scaffold_frames())
        torch.testing.assert_close(v.T @ v, torch.eye(R), atol=1e-5, rtol=0)
        torch.testing.assert_close(u, v.T, atol=1e-6, rtol=0)
    x = _data(seed=0, bias=4.0).sample(512).activations
    with torch.no_grad():
        s_train = sae.scaffold(x)
        f_train = sae.encode(x)
        out_train = sae.decode(f_train)  # consumes the scaffold left by encode
        sae.save_inference_model(tmp_path / "inf")
        sae.save_model(tmp_path / "train")
        loaded = SAE.load_from_disk(tmp_path / "inf")
        assert isinstance(loaded, ScaffoldJumpReLUSAE)
        torch.testing.assert_close(loaded.scaffold(x), s_train, atol=1e-5, rtol=1e-5)
        # SAELens folds the decoder norms into the saved encoder when it rescales by them; the
        # latents are the same
        scale = sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else torch.ones(D_SAE)
        _, cache = loaded.run_with_cache(x)
        torch.testing.assert_close(
            cache["hook_sae_acts_pre"], sae.run_with_cache(x)[1]["hook_sae_acts_pre"] * scale, atol=1e-4, rtol=1e-4
        )
        loaded.encode(x)  # leaves its scaffold pending for decode
        torch.testing.assert_close(loaded.decode(f_train), out_train, atol=1e-4, rtol=1e-4)
        again = TrainingSAE.load_from_disk(tmp_path / "train")
        torch.testing.assert_close(again.scaffold(x), s_train)
        torch.testing.assert_close(again.decode(again.encode(x)), out_train)


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_folds_keep_outputs_for_every_option(opts) -> None:
    sae = _make("scaffold_batchtopk", dtype="float64", **opts)
    gen = _data(bias=3.0)
    x = gen.sample(256).activations.double()
    with torch.no_grad():
        sae.training_forward_pass(_step(x))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):  # move away from the init so nothing is trivially symmetric
        sae.training_forward_pass(_step(gen.sample(128).activations.double())).loss.backward()
        opt.step()
        opt.zero_grad()
    g = torch.Generator().manual_seed(3)
    mean = x.mean(0)
    m = torch.eye(D_IN, dtype=torch.float64) + 0.2 * torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    m_inv = torch.linalg.inv(m)
    with torch.no_grad():
        whitened = copy.deepcopy(sae)
        before = whitened((x - mean) @ m) @ m_inv + mean
        whitened.fold_activation_whitening(mean, m, m_inv)
        torch.testing.assert_close(whitened(x), before)
        c = 2.5
        before = sae(c * x) / c
        sae.fold_activation_norm_scaling_factor(c)
        torch.testing.assert_close(sae(x), before)
