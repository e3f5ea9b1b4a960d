import subprocess
import sys

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_ext import registry


def test_every_plugin_architecture_is_registered_for_training_and_inference() -> None:
    assert registry.plugin_training_architectures(), "no plugin architecture registered"
    for name, inference in registry.PLUGIN_TRAINING_ARCHITECTURES.items():
        assert name in SAE_TRAINING_CLASS_REGISTRY
        assert inference in SAE_CLASS_REGISTRY
        assert SAE_CLASS_REGISTRY[inference][0].__module__.startswith("sae_ext.")


def test_import_twice_and_reload_do_not_raise() -> None:
    # in a subprocess: reloading replaces the class objects, which would leak into other tests
    code = """
import importlib
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
import sae_ext
from sae_ext import registry
before = set(SAE_TRAINING_CLASS_REGISTRY)
importlib.import_module("sae_ext")
importlib.reload(sae_ext)
for arch in list(registry.PLUGIN_TRAINING_ARCHITECTURES):
    importlib.reload(importlib.import_module(SAE_TRAINING_CLASS_REGISTRY[arch][0].__module__))
assert set(SAE_TRAINING_CLASS_REGISTRY) == before
print("ok", len(registry.PLUGIN_TRAINING_ARCHITECTURES))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", str(len(registry.PLUGIN_TRAINING_ARCHITECTURES))]
    assert len(registry.PLUGIN_TRAINING_ARCHITECTURES) == 5  # sign_aware_gated, 2 scaffold, 2 SASA


def test_name_owned_by_someone_else_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register_inference("standard", type("Other", (), {}), StandardSAEConfig)
    assert SAE_CLASS_REGISTRY["standard"][0] is StandardSAE


def test_load_from_disk_finds_plugin_architectures_after_import(tmp_path) -> None:
    from sae_ext.testing import small_training_config

    for arch in registry.plugin_training_architectures():
        cfg = small_training_config(arch)
        sae = SAE_TRAINING_CLASS_REGISTRY[arch][0](cfg)
        sae.save_inference_model(tmp_path / arch)
        loaded = SAE.load_from_disk(tmp_path / arch)
        assert loaded.cfg.architecture() == registry.PLUGIN_TRAINING_ARCHITECTURES[arch]
        assert torch.isfinite(loaded(torch.randn(3, cfg.d_in))).all()
