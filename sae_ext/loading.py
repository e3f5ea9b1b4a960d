"""Load a saved SAE directory with one clear error per problem, then hand over to SAELens.

``SAE.load_from_disk`` reports a missing file, an unregistered architecture, a damaged
weights file or a state-dict mismatch as a bare ``KeyError``, a Rust deserialisation error or
a ``load_state_dict`` traceback. :func:`check_sae_dir` reads only ``cfg.json`` and the
safetensors header (no tensor data) and raises:

- ``FileNotFoundError`` naming the missing directory, ``cfg.json`` or weights file;
- ``ValueError`` for unreadable ``cfg.json``, an unknown architecture (listing the registered
  ones), a config the architecture rejects, a corrupt or truncated weights file, missing or
  unexpected tensors (listed), or tensor shapes that do not fit the config.

:func:`load_sae` runs those checks and then calls ``SAE.load_from_disk``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.util import DTYPE_MAP, str_to_dtype
from safetensors import SafetensorError, safe_open

from sae_ext.registry import PLUGIN_TRAINING_ARCHITECTURES, plugin_inference_architectures

__all__ = ["check_sae_dir", "load_sae"]

#: Tensors SAELens's disk loader consumes itself (an old-style folded scaling factor).
_LOADER_HANDLED_KEYS = frozenset({"scaling_factor"})


def _read_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found: a saved SAE directory holds {SAE_CFG_FILENAME} and "
            f"{SAE_WEIGHTS_FILENAME} (written by sae.save_model / save_inference_model)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object; got {type(cfg).__name__}")
    return handle_config_defaulting(cfg)


def _unknown_architecture(cfg_path: Path, architecture: Any) -> ValueError:
    registered = sorted(SAE_CLASS_REGISTRY)
    if architecture in SAE_TRAINING_CLASS_REGISTRY:
        inference = PLUGIN_TRAINING_ARCHITECTURES.get(str(architecture))
        return ValueError(
            f"{cfg_path} names the training architecture {architecture!r}: this is a training "
            "checkpoint, not an inference SAE. Load it with TrainingSAE.load_from_disk, or "
            "write the inference SAE with save_inference_model"
            + (f" (saved as {inference!r})" if inference else "")
            + f". Registered inference architectures: {registered}."
        )
    return ValueError(
        f"{cfg_path} names architecture {architecture!r}, which is not registered with SAELens. "
        f"Registered inference architectures: {registered}. Plugin SAEs are registered when "
        f"their plugin is imported: `import sae_ext` registers {plugin_inference_architectures()}; "
        f"for an SAE from another plugin, import the package that registers {architecture!r} "
        "first."
    )


def _file_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header; ``ValueError`` if it is damaged."""
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise ValueError(
            f"{weights_path} is not a readable safetensors file (corrupt or truncated?): {e}"
        ) from e


def check_sae_dir(path: str | Path, dtype: str | None = None) -> dict[str, Any]:
    """Check that ``path`` holds a loadable saved inference SAE; return its config dict.

    Reads ``cfg.json`` and the safetensors header only. The expected tensors are those of the
    architecture's class built on the meta device from the config (after the class's own
    ``process_state_dict_for_loading`` renames, e.g. log thresholds), so the check follows
    each architecture, SAELens's included.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"SAE directory {path} not found")
    if dtype is not None and dtype not in DTYPE_MAP:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_MAP)} or None; got {dtype!r}")
    cfg_path = path / SAE_CFG_FILENAME
    cfg_dict = _read_cfg(path)
    weights_path = path / SAE_WEIGHTS_FILENAME
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} not found: the SAE directory {path} has a {SAE_CFG_FILENAME} but "
            "no weights"
        )
    architecture = cfg_dict.get("architecture")
    if not isinstance(architecture, str) or architecture not in SAE_CLASS_REGISTRY:
        raise _unknown_architecture(cfg_path, architecture)
    sae_cls, cfg_cls = SAE_CLASS_REGISTRY[architecture]
    meta_cfg = dict(cfg_dict, device="meta")
    if dtype is not None:
        meta_cfg["dtype"] = dtype
    try:
        sae_cfg = cfg_cls.from_dict(meta_cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SAELens warns at construction; the load will too
            sae = sae_cls(sae_cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{cfg_path} is not a valid {architecture!r} config: {e}") from e
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}

    file_shapes = _file_shapes(weights_path)
    as_loaded: dict[str, Any] = {
        k: torch.empty(shape, dtype=str_to_dtype(sae_cfg.dtype), device="meta")
        for k, shape in file_shapes.items()
        if k not in _LOADER_HANDLED_KEYS
    }
    sae.process_state_dict_for_loading(as_loaded)
    missing = sorted(set(expected) - set(as_loaded))
    unexpected = sorted(set(as_loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match its {architecture!r} config: "
            f"missing tensors {missing}, unexpected tensors {unexpected} "
            f"(expected {sorted(expected)})"
        )
    wrong = {
        k: (tuple(v.shape), expected[k])
        for k, v in as_loaded.items()
        if tuple(v.shape) != expected[k]
    }
    if wrong:
        detail = ", ".join(
            f"{k}: {got} (expected {want})" for k, (got, want) in sorted(wrong.items())
        )
        raise ValueError(
            f"{weights_path} has tensor shapes that do not fit its config "
            f"(d_in={sae_cfg.d_in}, d_sae={sae_cfg.d_sae}): {detail}"
        )
    return cfg_dict


def load_sae(path: str | Path, device: str = "cpu", dtype: str | None = None) -> SAE[Any]:
    """Load the inference SAE saved at ``path`` after :func:`check_sae_dir`; see the module doc.

    ``device`` and ``dtype`` (e.g. ``"bfloat16"``; default: the saved config's) are passed to
    ``SAE.load_from_disk``.
    """
    check_sae_dir(path, dtype=dtype)
    return SAE.load_from_disk(path, device=device, dtype=dtype)
