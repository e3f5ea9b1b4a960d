"""The convergence check (SPEC §8): a run and its half-budget twin, compared on held-out R²."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

from sae_ext.capture import PROTOCOL_FILE, capture_activations
from sae_ext.convergence import HALF_BUDGET_DIR, heldout_r2, run_convergence, train_with_half_budget
from sae_ext.testing import random_token_dataset, small_training_config, tiny_hooked_transformer

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    model = tiny_hooked_transformer()
    return model, capture_activations(model, random_token_dataset(64, 16), HOOK, tmp_path_factory.mktemp("c") / "cap")


def test_half_budget_twin_is_its_own_run_with_its_own_schedule(cache, tmp_path) -> None:
    model, cap = cache
    cfg = small_training_config("topk", d_in=32, d_sae=64, k=4)
    train_with_half_budget(cfg, cap, model, tmp_path, training_tokens=64 * 40, train_batch_size_tokens=64,
                           lr=1e-3, exclude_special_tokens=False)
    full = json.loads((tmp_path / PROTOCOL_FILE).read_text())
    half = json.loads((tmp_path / HALF_BUDGET_DIR / PROTOCOL_FILE).read_text())
    assert (full["training_tokens"], half["training_tokens"]) == (2560, 1280)
    # SPEC §8's schedule, sized to each run: warm-up 1 %, decay over the last 20 % of its own steps
    assert (full["lr_decay_steps"], half["lr_decay_steps"]) == (8, 4)
    assert (full["dead_feature_window"], half["dead_feature_window"]) == (4, 2)
    x = cap.activations()[:512]
    conv = run_convergence(tmp_path, x)
    assert conv.half_budget_tokens == 1280
    assert conv.r2 == pytest.approx(heldout_r2(SAE.load_from_disk(tmp_path), x))
    assert conv.r2_half == pytest.approx(heldout_r2(SAE.load_from_disk(tmp_path / HALF_BUDGET_DIR), x))
    assert conv.r2 != conv.r2_half  # two different runs
    assert conv.converged == (abs(conv.r2 - conv.r2_half) <= conv.tolerance)


def test_a_saved_run_of_half_the_budget_is_reused_as_the_twin(cache, tmp_path, monkeypatch) -> None:
    """Doubling a budget: the finished shorter run is copied as the twin, not trained again, and
    gives the twin that training would (same settings, same seed)."""
    import sae_ext.convergence as conv_mod

    model, cap = cache
    cfg = small_training_config("topk", d_in=32, d_sae=64, k=4)
    kw = {"train_batch_size_tokens": 64, "lr": 1e-3, "exclude_special_tokens": False, "seed": 3}
    train_with_half_budget(cfg, cap, model, tmp_path / "trained", training_tokens=64 * 40, **kw)
    conv_mod.train_on_cache(cfg, cap, model, None, tmp_path / "short", training_tokens=64 * 20, **kw)
    trained_calls: list[int] = []
    real = conv_mod.train_on_cache
    monkeypatch.setattr(conv_mod, "train_on_cache",
                        lambda *a, **k: trained_calls.append(k["training_tokens"]) or real(*a, **k))
    train_with_half_budget(cfg, cap, model, tmp_path / "reused", training_tokens=64 * 40,
                           half_budget_from=tmp_path / "short", **kw)
    assert trained_calls == [2560]  # only the full run was trained
    x = cap.activations()[:512]
    a, b = run_convergence(tmp_path / "trained", x), run_convergence(tmp_path / "reused", x)
    assert b.half_budget_tokens == 1280
    assert b.r2_half == pytest.approx(a.r2_half, abs=1e-5) and b.r2 == pytest.approx(a.r2, abs=1e-5)
    with pytest.raises(ValueError, match="must be a saved run of 640 tokens"):
        train_with_half_budget(cfg, cap, model, tmp_path / "bad", training_tokens=1280,
                               half_budget_from=tmp_path / "short", **kw)
    (tmp_path / "short" / "sae_weights.safetensors").rename(tmp_path / "weights")
    with pytest.raises(ValueError, match="has no saved SAE"):
        train_with_half_budget(cfg, cap, model, tmp_path / "bad", training_tokens=2560,
                               half_budget_from=tmp_path / "short", **kw)
    with pytest.raises(ValueError, match="holds no saved protocol run"):
        train_with_half_budget(cfg, cap, model, tmp_path / "bad", training_tokens=1280,
                               half_budget_from=tmp_path / "nowhere", **kw)
    assert not (tmp_path / "bad").exists()


def test_bad_inputs(cache, tmp_path) -> None:
    model, cap = cache
    cfg = small_training_config("topk", d_in=32, d_sae=64, k=4)
    with pytest.raises(ValueError, match="training_tokens"):
        train_with_half_budget(cfg, cap, model, tmp_path, training_tokens=1)
    with pytest.raises(ValueError, match="no half-budget run"):
        run_convergence(tmp_path, torch.randn(8, 32))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="d_in=32"):
        heldout_r2(SAE.from_dict(cfg.get_inference_sae_cfg_dict()), torch.randn(8, 31))
