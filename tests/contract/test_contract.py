"""The architecture contract: every architecture this package registers must pass it unchanged.

It is also run on SAELens's own ``gated`` and ``batchtopk`` so that the suite itself is
proven against implementations we did not write.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_lens import (
    SAE,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TrainingSAE,
    TrainingSAEConfig,
)
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput

from sae_ext.registry import plugin_training_architectures
from sae_ext.testing import fit_on_stream, small_training_config, tiny_hooked_transformer

SAELENS_REFERENCE = ["gated", "batchtopk"]
ARCHITECTURES = SAELENS_REFERENCE + plugin_training_architectures()
D_IN, D_SAE = 32, 128
HOOK = "blocks.0.hook_resid_post"


def _sparse_activations(n: int, d_in: int = D_IN, n_feats: int = 64, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative combinations of random unit directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feats, d_in, generator=g), dim=-1)
    mask = torch.rand(n, n_feats, generator=g) < 0.05
    mags = torch.rand(n, n_feats, generator=g) * 2 + 0.5
    return (mask * mags) @ dirs + 0.1


def _coefficients(sae: TrainingSAE) -> dict[str, float]:
    return {
        k: v.value if isinstance(v, TrainCoefficientConfig) else float(v)
        for k, v in sae.get_coefficients().items()
    }


def _step_input(sae: TrainingSAE, x: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients=_coefficients(sae),
        dead_neuron_mask=torch.zeros(sae.cfg.d_sae, dtype=torch.bool),
        n_training_steps=0,
        is_logging_step=True,
    )


def _make(arch: str) -> TrainingSAE:
    cfg = small_training_config(arch, d_in=D_IN, d_sae=D_SAE)
    return get_sae_training_class(arch)[0](cfg)


def _train(sae: TrainingSAE, x: torch.Tensor, steps: int = 150, batch: int = 256) -> TrainingSAE:
    """A short run of SAELens's own trainer over an in-memory activation stream."""

    def stream():
        g = torch.Generator().manual_seed(1)
        while True:
            yield x[torch.randint(0, x.shape[0], (batch,), generator=g)]

    return fit_on_stream(sae, stream(), steps, batch, dead_feature_window=50, feature_sampling_window=100)


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    return _sparse_activations(4096)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_dict_round_trip(arch: str) -> None:
    cfg = small_training_config(arch, d_in=D_IN, d_sae=D_SAE)
    again = TrainingSAEConfig.from_dict(cfg.to_dict())
    assert type(again) is type(cfg)
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_forward_backward_finite(arch: str, acts: torch.Tensor) -> None:
    sae = _make(arch)
    out = sae.training_forward_pass(_step_input(sae, acts[:128]))
    assert out.sae_out.shape == (128, D_IN)
    assert out.feature_acts.shape == (128, D_SAE)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in sae.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    for name, p in sae.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_short_training_lowers_loss(arch: str, acts: torch.Tensor) -> None:
    sae = _make(arch)
    held_out = acts[-512:]
    with torch.no_grad():
        before = sae.training_forward_pass(_step_input(sae, held_out)).losses["mse_loss"].item()
    _train(sae, acts[:-512])
    with torch.no_grad():
        after = sae.training_forward_pass(_step_input(sae, held_out)).losses["mse_loss"].item()
    assert after < 0.7 * before, (before, after)


@pytest.fixture(scope="module")
def trained(acts: torch.Tensor) -> dict[str, TrainingSAE]:
    cache: dict[str, TrainingSAE] = {}
    return cache


def _trained(arch: str, acts: torch.Tensor, cache: dict[str, TrainingSAE]) -> TrainingSAE:
    if arch not in cache:
        torch.manual_seed(0)
        cache[arch] = _train(_make(arch), acts, steps=100)
    return cache[arch]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_inference_and_load_round_trip(
    arch: str, acts: torch.Tensor, trained: dict[str, TrainingSAE], tmp_path: Path
) -> None:
    sae = _trained(arch, acts, trained)
    sae.save_inference_model(tmp_path / "a")
    loaded = SAE.load_from_disk(tmp_path / "a")
    assert not isinstance(loaded, TrainingSAE)
    assert loaded.cfg.d_in == D_IN and loaded.cfg.d_sae == D_SAE
    x = acts[:256]
    with torch.no_grad():
        y = loaded(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        # the loaded SAE reconstructs as well as a trivial mean predictor at least
        fvu = (y - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert fvu < 1.0
        # saving the inference SAE again and reloading is exact
        loaded.save_model(tmp_path / "b")
        again = SAE.load_from_disk(tmp_path / "b")
        torch.testing.assert_close(again(x), y)
        torch.testing.assert_close(again.encode(x), loaded.encode(x))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_W_dec_norm_preserves_outputs(
    arch: str, acts: torch.Tensor, trained: dict[str, TrainingSAE], tmp_path: Path
) -> None:
    sae = _trained(arch, acts, trained)
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    with torch.no_grad():
        # make the decoder norms far from one so the fold has something to do
        scale = torch.linspace(0.5, 2.0, D_SAE, dtype=loaded.W_dec.dtype)
        loaded.W_dec.data *= scale[:, None]
        x = acts[:256]
        before = loaded(x)
        loaded.fold_W_dec_norm()
        torch.testing.assert_close(loaded.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(x), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_splice_with_error_term_reproduces_clean_logits(
    arch: str, acts: torch.Tensor, trained: dict[str, TrainingSAE], tmp_path: Path
) -> None:
    model = tiny_hooked_transformer(d_model=D_IN, cls=HookedSAETransformer)
    sae = _trained(arch, acts, trained)
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    loaded.cfg.metadata.hook_name = HOOK
    tokens = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        clean = model(tokens)
        model.add_sae(loaded, use_error_term=True)
        spliced, cache = model.run_with_cache(tokens)
        model.reset_saes()
        model.add_sae(loaded, use_error_term=False)
        plain = model(tokens)
        model.reset_saes()
    torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=1e-4)
    assert f"{HOOK}.hook_sae_error" in cache
    assert not torch.allclose(plain, clean, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_language_model_runner_saves_loadable_sae(arch: str, token_dataset, tmp_path: Path) -> None:
    model = tiny_hooked_transformer(d_model=D_IN)
    cfg = LanguageModelSAERunnerConfig(
        sae=small_training_config(arch, d_in=D_IN, d_sae=D_SAE),
        model_name="tiny",
        hook_name=HOOK,
        dataset_path="tiny",
        context_size=16,
        training_tokens=16 * 64,
        train_batch_size_tokens=64,
        store_batch_size_prompts=4,
        n_batches_in_buffer=4,
        lr=1e-3,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(tmp_path / "out"),
        checkpoint_path=str(tmp_path / "ckpt"),
        n_batches_for_norm_estimate=2,
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=token_dataset, override_model=model)
    runner.run()
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert loaded.cfg.metadata.hook_name == HOOK
    x = torch.randn(8, D_IN)
    assert torch.isfinite(loaded(x)).all()
