"""Scaffolded SAEs (SPEC §2), beyond the architecture contract suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_ext.metrics.dense import dense_fraction, firing_counts
from sae_ext.metrics.pca import pca_directions, principal_angle_cosines
from sae_ext.registry import PLUGIN_TRAINING_ARCHITECTURES
from sae_ext.saes.scaffold import (
    ScaffoldBatchTopKTrainingSAE,
    ScaffoldBatchTopKTrainingSAEConfig,
    ScaffoldJumpReLUSAE,
    ScaffoldJumpReLUSAEConfig,
    ScaffoldMatryoshkaBatchTopKTrainingSAE,
    ScaffoldMatryoshkaBatchTopKTrainingSAEConfig,
    default_matryoshka_widths,
)
from sae_ext.synthetic.lowrank import SparsePlusLowRank
from sae_ext.testing import fit_on_stream, tiny_hooked_transformer, train_step_input

ARCHS = ["scaffold_batchtopk", "scaffold_matryoshka_batchtopk"]
D_IN, D_SAE, R, K = 32, 128, 4, 4
HOOK = "blocks.0.hook_resid_post"


def _cfg(arch: str, **kw):
    cls = get_sae_training_class(arch)[1]
    kw.setdefault("scaffold_rank", R)
    kw.setdefault("k", K)
    return cls(d_in=D_IN, d_sae=D_SAE, **kw)


def _make(arch: str, **kw) -> TrainingSAE:
    return get_sae_training_class(arch)[0](_cfg(arch, **kw))


def _step(x: torch.Tensor, logging: bool = False) -> TrainStepInput:
    return train_step_input(x, D_SAE, logging)


def _data(seed: int = 0) -> SparsePlusLowRank:
    return SparsePlusLowRank(D_IN, 96, R, dense_std=3.0, orthogonalize=False, seed=seed)


def _train(sae: TrainingSAE, gen: SparsePlusLowRank, steps: int, batch: int = 256) -> TrainingSAE:
    return fit_on_stream(
        sae, gen.batches(batch), steps, batch, dead_feature_window=100, feature_sampling_window=200
    )


def _ev(x: torch.Tensor, y: torch.Tensor) -> float:
    return 1 - ((x - y).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def _inference(rank: int = 3, d_in: int = 16, d_sae: int = 48, seed: int = 0, **kw) -> ScaffoldJumpReLUSAE:
    """An inference scaffold SAE with random (non-degenerate) weights in float64."""
    cfg = ScaffoldJumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, scaffold_rank=rank, dtype="float64", **kw)
    sae = ScaffoldJumpReLUSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        sae.threshold.copy_(torch.rand(d_sae, generator=g, dtype=torch.float64) * 0.1)
    return sae


# --------------------------------------------------------------------------- registration, config


def test_registered_and_saved_as_scaffold_jumprelu() -> None:
    for arch in ARCHS:
        assert PLUGIN_TRAINING_ARCHITECTURES[arch] == "scaffold_jumprelu"
        assert _cfg(arch).get_inference_config_class() is ScaffoldJumpReLUSAEConfig
    assert get_sae_class("scaffold_jumprelu") == (ScaffoldJumpReLUSAE, ScaffoldJumpReLUSAEConfig)
    assert isinstance(_make(ARCHS[0]), ScaffoldBatchTopKTrainingSAE)
    assert isinstance(_make(ARCHS[1]), ScaffoldMatryoshkaBatchTopKTrainingSAE)


def test_defaults_are_valid_at_the_cli_width_and_test_width() -> None:
    for cls in (ScaffoldBatchTopKTrainingSAEConfig, ScaffoldMatryoshkaBatchTopKTrainingSAEConfig):
        for d_in, d_sae in ((32, 128), (512, 1024)):
            cfg = cls(d_in=d_in, d_sae=d_sae)
            assert (cfg.scaffold_rank, cfg.scaffold_init, cfg.scaffold_encoder_input) == (8, "pca", "residual")
            assert (cfg.scaffold_tied, cfg.scaffold_lr_scale) == (False, 1.0)
    assert ScaffoldJumpReLUSAEConfig(d_in=32, d_sae=64).scaffold_encoder_input == "residual"
    m = ScaffoldMatryoshkaBatchTopKTrainingSAEConfig(d_in=32, d_sae=128)
    assert m.matryoshka_widths == default_matryoshka_widths(128) == [2, 8, 32, 128]
    assert default_matryoshka_widths(1024) == [16, 64, 256, 1024]
    assert default_matryoshka_widths(3) == [3]
    # explicit widths are kept as given (SAELens's own validation applies at construction)
    assert ScaffoldMatryoshkaBatchTopKTrainingSAEConfig(
        d_in=32, d_sae=128, matryoshka_widths=[16, 128]
    ).matryoshka_widths == [16, 128]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rank", [0, -1, 32, 33, 2.0, True])
def test_bad_scaffold_rank_is_a_clear_error(arch: str, rank) -> None:
    with pytest.raises(ValueError, match=r"scaffold_rank .*1\.\.31.*got " + repr(rank).replace(".", r"\.")):
        _cfg(arch, scaffold_rank=rank)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("field", "value"),
    [("scaffold_init", "PCA"), ("scaffold_init", "zeros"), ("scaffold_encoder_input", "both")],
)
def test_bad_scaffold_strings_are_clear_errors(arch: str, field: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"{field} must be one of .*got '{value}'"):
        _cfg(arch, **{field: value})


def test_inference_config_errors() -> None:
    with pytest.raises(ValueError, match=r"1\.\.15.*got 16"):
        ScaffoldJumpReLUSAEConfig(d_in=16, d_sae=32, scaffold_rank=16)
    with pytest.raises(ValueError, match="scaffold_encoder_input"):
        ScaffoldJumpReLUSAEConfig(d_in=16, d_sae=32, scaffold_encoder_input="residue")  # type: ignore[arg-type]


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_matryoshka_refuses_stateful_runtime_norms(norm: str) -> None:
    with pytest.raises(ValueError, match=norm):
        _cfg("scaffold_matryoshka_batchtopk", normalize_activations=norm)


# --------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("arch", ARCHS)
def test_pca_init_spans_top_principal_subspace_of_first_batch(arch: str) -> None:
    sae = _make(arch)
    assert not bool(sae.scaffold_initialized)
    first = _data().sample(512).activations + 5.0  # an offset: PCA is of the centred batch
    with torch.no_grad():
        sae.training_forward_pass(_step(first))
    assert bool(sae.scaffold_initialized)
    target = pca_directions(first, R)
    cos = principal_angle_cosines(sae.scaffold_subspace(), target)
    assert cos.min().item() > 1 - 1e-6
    cos_v = principal_angle_cosines(sae.scaffold_V.detach(), target)
    assert cos_v.min().item() > 1 - 1e-6
    torch.testing.assert_close(sae.scaffold_U.detach(), sae.scaffold_V.detach().T)
    # only the first batch initialises
    v = sae.scaffold_V.detach().clone()
    with torch.no_grad():
        sae.training_forward_pass(_step(torch.randn(512, D_IN) * 10))
    assert torch.equal(sae.scaffold_V.detach(), v)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_checkpoint_resumes_without_re_initialising(arch: str, tmp_path: Path) -> None:
    sae = _make(arch)
    x = _data().sample(256).activations
    with torch.no_grad():
        sae.training_forward_pass(_step(x))
    sae.save_model(tmp_path)
    again = TrainingSAE.load_from_disk(tmp_path)
    assert type(again) is type(sae) and bool(again.scaffold_initialized)
    with torch.no_grad():
        again.training_forward_pass(_step(torch.randn(256, D_IN) * 10))  # not a "first batch"
    assert torch.equal(again.scaffold_V.detach(), sae.scaffold_V.detach())


def test_loading_an_uninitialised_state_makes_the_next_step_initialise_again() -> None:
    """The host-side copy of ``scaffold_initialized`` (no device read per step) follows loads."""
    sae = _make("scaffold_batchtopk")
    fresh = {k: v.clone() for k, v in sae.state_dict().items()}
    with torch.no_grad():
        sae.training_forward_pass(_step(_data().sample(256).activations))
    sae.load_state_dict(fresh)
    assert not bool(sae.scaffold_initialized)
    second = _data(seed=1).sample(512).activations + 5.0
    with torch.no_grad():
        sae.training_forward_pass(_step(second))
    assert bool(sae.scaffold_initialized)
    cos = principal_angle_cosines(sae.scaffold_subspace(), pca_directions(second, R))
    assert cos.min().item() > 1 - 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_topk_threshold_stays_at_least_float32_under_casts(arch: str) -> None:
    sae = _make(arch)
    with torch.no_grad():
        sae.training_forward_pass(_step(_data().sample(256).activations))
    value = sae.topk_threshold.item()
    sae.to(torch.bfloat16)
    assert sae.W_dec.dtype == torch.bfloat16 and sae.topk_threshold.dtype == torch.float64
    assert sae.topk_threshold.item() == value  # not rounded through bf16
    assert _make(arch, dtype="bfloat16").to(torch.float16).topk_threshold.dtype == torch.float64


def test_inference_threshold_is_float32_in_an_sae_built_in_bf16() -> None:
    """Built directly in bf16 (no ``.to`` call to restore it), the threshold is float32."""
    cfg = _cfg("scaffold_batchtopk", dtype="bfloat16").get_inference_sae_cfg_dict()
    sae = SAE.from_dict(cfg)
    assert sae.W_dec.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32


def test_random_init_is_an_orthonormal_frame_kept_on_the_first_batch() -> None:
    sae = _make("scaffold_batchtopk", scaffold_init="random")
    assert bool(sae.scaffold_initialized)
    v = sae.scaffold_V.detach().clone()
    torch.testing.assert_close(v.T @ v, torch.eye(R), atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.scaffold_U.detach(), v.T)
    with torch.no_grad():
        sae.training_forward_pass(_step(_data().sample(256).activations))
    assert torch.equal(sae.scaffold_V.detach(), v)
    # and the random frame is not the data's principal subspace
    cos = principal_angle_cosines(v, _data().dense_basis)
    assert cos.min().item() < 0.9


def test_scaffold_subspace_is_the_range_of_the_map() -> None:
    sae = _inference(rank=3)
    basis = sae.scaffold_subspace()
    assert basis.shape == (16, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=basis.dtype), atol=1e-10, rtol=0)
    # s = x̃ V U lies in the span of the basis, and the basis spans the rows of U
    s = sae.scaffold(torch.randn(20, 16, dtype=torch.float64))
    torch.testing.assert_close((s @ basis) @ basis.T, s)
    cos = principal_angle_cosines(basis, sae.scaffold_U.detach().T)
    torch.testing.assert_close(cos, torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------- forward semantics


@pytest.mark.parametrize("mode", ["full", "residual"])
def test_encoder_input_modes(mode: str) -> None:
    sae = _inference(scaffold_encoder_input=mode)
    x = torch.randn(10, 16, dtype=torch.float64)
    _, cache = sae.run_with_cache(x)
    x_tilde = x - sae.b_dec
    s = (x_tilde @ sae.scaffold_V) @ sae.scaffold_U
    enc_in = x_tilde - s if mode == "residual" else x_tilde
    torch.testing.assert_close(cache["hook_sae_acts_pre"], enc_in @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(cache["hook_scaffold"], s)
    f = cache["hook_sae_acts_post"]
    torch.testing.assert_close(cache["hook_sae_recons"], f @ sae.W_dec + s + sae.b_dec)


def test_residual_mode_passes_scaffold_subspace_perturbations_straight_through() -> None:
    """With U = Vᵀ orthonormal, "residual" latents ignore the scaffold subspace; "full" ones don't."""
    x = torch.randn(64, 16, dtype=torch.float64)
    for mode in ("full", "residual"):
        sae = _inference(scaffold_encoder_input=mode, rank=3)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(16, 3, dtype=torch.float64))
            sae.scaffold_V.copy_(q)
            sae.scaffold_U.copy_(q.T)
        delta = torch.randn(64, 3, dtype=torch.float64) @ q.T * 3.0
        with torch.no_grad():
            f0, f1 = sae.encode(x), sae.encode(x + delta)
            y0, y1 = sae(x), sae(x + delta)
        if mode == "residual":
            torch.testing.assert_close(f1, f0)
            torch.testing.assert_close(y1 - y0, delta)
        else:
            assert not torch.allclose(f1, f0)


def test_decode_without_encode_has_no_scaffold_and_mismatch_is_an_error() -> None:
    sae = _inference()
    f = torch.rand(5, 48, dtype=torch.float64)
    torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec)
    sae.encode(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"leading shape \(5,\).*\(3,\)"):
        sae.decode(f)
    # the pending scaffold was consumed by the failed call: the next decode is plain again
    torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec)


# --------------------------------------------------------------------------- splicing


@pytest.fixture(scope="module")
def spliced_sae(tmp_path_factory) -> dict[str, SAE]:
    """Inference scaffold SAEs whose scaffold was PCA-initialised on the tiny model's activations."""
    model = tiny_hooked_transformer(d_model=D_IN, cls=HookedSAETransformer)
    tokens = torch.randint(1, 97, (16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    acts = cache[HOOK].reshape(-1, D_IN)
    out: dict[str, SAE] = {}
    for mode in ("full", "residual"):
        torch.manual_seed(0)
        sae = _make("scaffold_batchtopk", scaffold_encoder_input=mode)
        with torch.no_grad():
            for _ in range(3):
                sae.training_forward_pass(_step(acts))
        path = tmp_path_factory.mktemp(mode)
        sae.save_inference_model(path)
        loaded = SAE.load_from_disk(path)
        loaded.cfg.metadata.hook_name = HOOK
        out[mode] = loaded
    return out


@pytest.mark.parametrize("mode", ["full", "residual"])
@pytest.mark.parametrize("use_error_term", [False, True])
def test_zeroing_hook_scaffold_in_a_spliced_model_removes_exactly_s(
    spliced_sae: dict[str, SAE], mode: str, use_error_term: bool
) -> None:
    sae = spliced_sae[mode]
    assert isinstance(sae, ScaffoldJumpReLUSAE)
    model = tiny_hooked_transformer(d_model=D_IN, cls=HookedSAETransformer)
    tokens = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    names = [f"{HOOK}.{h}" for h in ("hook_scaffold", "hook_sae_recons", "hook_sae_output", "hook_sae_acts_post")]
    zero = [(f"{HOOK}.hook_scaffold", lambda t, hook: torch.zeros_like(t))]
    with torch.no_grad():
        model.add_sae(sae, use_error_term=use_error_term)
        logits, cache = model.run_with_cache(tokens, names_filter=names)
        with model.hooks(fwd_hooks=zero):
            logits_abl, cache_abl = model.run_with_cache(tokens, names_filter=names)
        model.reset_saes()
    s = cache[f"{HOOK}.hook_scaffold"]
    assert s.shape == (2, 10, D_IN) and s.abs().max() > 0.1
    assert cache_abl[f"{HOOK}.hook_scaffold"].abs().max() == 0
    # the latents do not move; the reconstruction and the spliced output drop by exactly s
    torch.testing.assert_close(cache_abl[f"{HOOK}.hook_sae_acts_post"], cache[f"{HOOK}.hook_sae_acts_post"])
    for name in ("hook_sae_recons", "hook_sae_output"):
        diff = cache[f"{HOOK}.{name}"] - cache_abl[f"{HOOK}.{name}"]
        torch.testing.assert_close(diff, s, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, logits_abl, atol=1e-3)


# --------------------------------------------------------------------------- folds


@pytest.mark.parametrize("mode", ["full", "residual"])
def test_fold_W_dec_norm_leaves_the_scaffold_alone(mode: str) -> None:
    sae = _inference(scaffold_encoder_input=mode)
    x = torch.randn(32, 16, dtype=torch.float64)
    u, v = sae.scaffold_U.detach().clone(), sae.scaffold_V.detach().clone()
    with torch.no_grad():
        before = sae(x)
        sae.fold_W_dec_norm()
        after = sae(x)
    torch.testing.assert_close(after, before)
    assert torch.equal(sae.scaffold_U.detach(), u) and torch.equal(sae.scaffold_V.detach(), v)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(48, dtype=torch.float64))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["full", "residual"])
def test_fold_activation_norm_scaling_factor_keeps_outputs(arch: str, mode: str, tmp_path: Path) -> None:
    """Trained on c·x, folded to take x: outputs scale by 1/c and U, V need no change."""
    c = 3.7
    sae = _make(arch, scaffold_encoder_input=mode)
    x = _data().sample(256).activations
    with torch.no_grad():
        sae.training_forward_pass(_step(c * x))  # PCA init + a threshold to save
        sae.save_inference_model(tmp_path / "unfolded")
        before = sae(c * x) / c
        u, v = sae.scaffold_U.detach().clone(), sae.scaffold_V.detach().clone()
        sae.fold_activation_norm_scaling_factor(c)
        after = sae(x)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert torch.equal(sae.scaffold_U.detach(), u) and torch.equal(sae.scaffold_V.detach(), v)
    # the same fold on the saved inference model
    loaded = SAE.load_from_disk(tmp_path / "unfolded")
    with torch.no_grad():
        ref = loaded(c * x) / c
        loaded.fold_activation_norm_scaling_factor(c)
        torch.testing.assert_close(loaded(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("mode", ["full", "residual"])
def test_fold_activation_whitening_includes_the_scaffold(apply_b_dec_to_input: bool, mode: str) -> None:
    sae = _inference(scaffold_encoder_input=mode, apply_b_dec_to_input=apply_b_dec_to_input)
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(16, generator=g, dtype=torch.float64)
    m = torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=g, dtype=torch.float64)
    m_inv = torch.linalg.inv(m)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64) * 2 + mean
    with torch.no_grad():
        before = sae((x - mean) @ m) @ m_inv + mean
        f_before = sae.encode((x - mean) @ m)
        sae.fold_activation_whitening(mean, m, m_inv)
        torch.testing.assert_close(sae.encode(x), f_before)
        torch.testing.assert_close(sae(x), before)


def test_fold_activation_whitening_on_the_training_sae() -> None:
    sae = _make("scaffold_batchtopk", scaffold_encoder_input="residual", dtype="float64")
    x = _data().sample(128).activations.double()
    g = torch.Generator().manual_seed(2)
    mean = x.mean(0)
    m = torch.eye(D_IN, dtype=torch.float64) + 0.2 * torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    m_inv = torch.linalg.inv(m)
    with torch.no_grad():
        sae.training_forward_pass(_step((x - mean) @ m))
        before = sae((x - mean) @ m) @ m_inv + mean
        sae.fold_activation_whitening(mean, m, m_inv)
        torch.testing.assert_close(sae(x), before)


# --------------------------------------------------------------------------- training


def test_training_metrics_scaffold_share_and_dense_window() -> None:
    sae = _make("scaffold_batchtopk")
    gen = _data()
    batches = [gen.sample(n).activations for n in (128, 64, 96)]
    outs = []
    with torch.no_grad():
        for x, logging in zip(batches, (False, True, False)):
            outs.append(sae.training_forward_pass(_step(x, logging=logging)))
    # the metrics are callables (no host sync per step), evaluated here after all three steps:
    # each must still report its own step's values
    assert all(callable(v) for o in outs for v in o.metrics.values() if not isinstance(v, torch.Tensor))
    metrics = [{k: v() if callable(v) else v for k, v in o.metrics.items()} for o in outs]
    # variance share, recomputed by hand from the scaffold and the reconstruction
    x = batches[2]
    s = sae.scaffold(x)
    recon = outs[2].sae_out
    share = (s - s.mean(0)).pow(2).sum() / (recon - recon.mean(0)).pow(2).sum()
    assert metrics[2]["scaffold_variance_share"] == pytest.approx(share.item(), rel=1e-4)
    counts = [firing_counts(o.feature_acts) for o in outs]
    assert metrics[0]["dense_latent_fraction"] == dense_fraction(counts[0], 128)
    # the window covers every step up to and including the logging step ...
    assert metrics[1]["dense_latent_fraction"] == dense_fraction(counts[0] + counts[1], 192)
    assert metrics[1]["dense_latent_fraction_batch"] == dense_fraction(counts[1], 64)
    # ... and restarts after it
    assert metrics[2]["dense_latent_fraction"] == dense_fraction(counts[2], 96)


def test_matryoshka_levels_all_include_the_scaffold() -> None:
    sae = _make("scaffold_matryoshka_batchtopk", matryoshka_widths=[16, 64, D_SAE])
    x = _data().sample(128).activations
    with torch.no_grad():
        sae.training_forward_pass(_step(x))  # PCA init
        out = sae.training_forward_pass(_step(x))
        s = sae.scaffold(x)
        f = out.feature_acts
        for w in (16, 64):
            partial = act_times_W_dec(f[:, :w], sae.W_dec[:w], True) + sae.b_dec + s
            expected = (partial - x).pow(2).sum(-1).mean()
            torch.testing.assert_close(out.losses[f"inner_mse_loss_{w}"], expected)
        full = act_times_W_dec(f, sae.W_dec, True) + sae.b_dec + s
        torch.testing.assert_close(out.sae_out, full)


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_model_reproduces_training_reconstruction(arch: str, tmp_path: Path) -> None:
    """After the BatchTopK threshold has converged, the saved JumpReLU SAE reconstructs as well."""
    torch.manual_seed(0)
    gen = _data(seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two on a shared machine
    try:
        sae = _train(_make(arch), gen, steps=400)
    finally:
        torch.set_num_threads(threads)
    x = gen.sample(2048).activations
    with torch.no_grad():
        ev_train = _ev(x, sae(x))
        sae.save_inference_model(tmp_path)
        loaded = SAE.load_from_disk(tmp_path)
        assert isinstance(loaded, ScaffoldJumpReLUSAE)
        ev_inf = _ev(x, loaded(x))
        l0_inf = (loaded.encode(x) > 0).float().sum(-1).mean().item()
    assert ev_train > 0.8, ev_train
    assert abs(ev_inf - ev_train) < 0.03, (ev_train, ev_inf)
    assert 0.5 * K < l0_inf < 2 * K, l0_inf
    # the learned scaffold sits on the dense ground-truth subspace
    cos = principal_angle_cosines(loaded.scaffold_subspace(), gen.dense_basis)
    assert cos.min().item() > 0.95


def test_inference_threshold_stays_float32_in_a_bf16_sae(tmp_path) -> None:
    from sae_lens import SAE
    from sae_lens.registry import get_sae_training_class

    from sae_ext.testing import small_training_config

    sae = get_sae_training_class("scaffold_batchtopk")[0](small_training_config("scaffold_batchtopk"))
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path, dtype="bfloat16")
    assert loaded.W_dec.dtype == torch.bfloat16
    assert loaded.threshold.dtype == torch.float32
    assert loaded.to(torch.bfloat16).threshold.dtype == torch.float32
    out = loaded(torch.randn(4, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
