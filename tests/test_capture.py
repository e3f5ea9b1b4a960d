from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from sae_ext.capture import ActivationCache, capture_activations, check_hook_name, train_on_cache
from sae_ext.testing import small_training_config

HOOK = "blocks.0.hook_resid_post"


def test_capture_stores_the_model_activations(tiny_model, token_dataset, tmp_path: Path) -> None:
    cache = capture_activations(tiny_model, token_dataset, HOOK, tmp_path / "c", n_tokens=512)
    assert cache.n_tokens >= 512 and cache.d_in == 32
    acts = cache.activations()
    toks = torch.tensor(token_dataset[: cache.n_tokens // 16]["input_ids"])
    _, ref = tiny_model.run_with_cache(toks, names_filter=[HOOK])
    torch.testing.assert_close(acts, ref[HOOK].reshape(-1, 32))
    # a second call with the same request reuses the stored capture
    again = capture_activations(tiny_model, token_dataset, HOOK, tmp_path / "c", n_tokens=256)
    assert again == cache == ActivationCache.load(tmp_path / "c")
    torch.testing.assert_close(cache.token_ids(), toks.reshape(-1))


def test_several_saes_train_on_one_capture_without_running_the_model(
    tiny_model, token_dataset, tmp_path: Path, monkeypatch
) -> None:
    cache = capture_activations(tiny_model, token_dataset, HOOK, tmp_path / "c", n_tokens=1024)

    def boom(*args, **kwargs):
        raise AssertionError("the model was run during training on cached activations")

    monkeypatch.setattr(tiny_model, "run_with_cache", boom)
    for arch in ("batchtopk", "gated"):
        train_on_cache(
            small_training_config(arch), cache, tiny_model, token_dataset, tmp_path / arch,
            training_tokens=2048, train_batch_size_tokens=128, exclude_special_tokens=[0],
        )
        sae = SAE.load_from_disk(tmp_path / arch)
        assert sae.cfg.metadata.hook_name == HOOK


def test_unknown_hook_lists_close_names(tiny_model, token_dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_post"):
        capture_activations(tiny_model, token_dataset, "blocks.0.hook_resid_pots", tmp_path / "x", n_tokens=64)
    assert not (tmp_path / "x").exists()
    assert check_hook_name(tiny_model, HOOK) == HOOK


def test_capture_rejects_impossible_budgets(tiny_model, token_dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exceeds"):
        capture_activations(tiny_model, token_dataset, HOOK, tmp_path / "x", n_tokens=10**6)
    with pytest.raises(ValueError, match="context size"):
        capture_activations(tiny_model, token_dataset, HOOK, tmp_path / "x", n_tokens=4)


def test_train_on_cache_rejects_wrong_d_in(tiny_model, token_dataset, tmp_path: Path) -> None:
    cache = capture_activations(tiny_model, token_dataset, HOOK, tmp_path / "c", n_tokens=256)
    with pytest.raises(ValueError, match="d_in"):
        train_on_cache(small_training_config("batchtopk", d_in=16, d_sae=64), cache, tiny_model, token_dataset, tmp_path / "s")


def test_kept_activations_drop_the_excluded_token_ids(tiny_model, token_dataset, tmp_path: Path) -> None:
    cache = capture_activations(tiny_model, token_dataset, HOOK, tmp_path / "c", n_tokens=512)
    ids, acts = cache.token_ids(), cache.activations()
    drop = sorted({int(ids[0]), int(ids[5])})
    kept = cache.kept_activations(drop)
    mask = ~torch.isin(ids, torch.tensor(drop))
    assert kept.shape == (int(mask.sum()), acts.shape[1]) and kept.shape[0] < acts.shape[0]
    assert torch.equal(kept, acts[mask])
    assert torch.equal(cache.kept_activations([]), acts)
    with pytest.raises(ValueError, match="token ids >= 0"):
        cache.kept_activations([-1])
