"""Idempotent registration of this package's architectures with SAELens's registries.

SAELens's ``register_sae_class`` raises when a name is registered twice, which breaks
``importlib.reload`` and notebooks that re-import. Here a name that is already registered
by the *same* class (same module and qualified name) is replaced silently; a name owned
by someone else is still an error.
"""

from __future__ import annotations

from typing import Any

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

#: training architecture name -> inference architecture name, for every plugin architecture.
PLUGIN_TRAINING_ARCHITECTURES: dict[str, str] = {}
#: inference architectures registered by this package.
PLUGIN_INFERENCE_ARCHITECTURES: set[str] = set()


def _same_class(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _register(registry: dict[str, tuple[Any, Any]], name: str, entry: tuple[type, type]) -> None:
    existing = registry.get(name)
    if existing is not None and not _same_class(existing[0], entry[0]):
        raise ValueError(
            f"SAE architecture {name!r} is already registered by "
            f"{existing[0].__module__}.{existing[0].__qualname__}; sae_ext will not replace it."
        )
    registry[name] = entry


def register_inference(name: str, sae_class: type, config_class: type) -> None:
    """Register an inference SAE class under ``name`` (idempotent for the same class)."""
    _register(SAE_CLASS_REGISTRY, name, (sae_class, config_class))
    PLUGIN_INFERENCE_ARCHITECTURES.add(name)


def register_training(
    name: str, sae_class: type, config_class: type, *, inference_architecture: str | None = None
) -> None:
    """Register a training SAE class under ``name`` (idempotent for the same class).

    ``inference_architecture`` is the name the trained SAE is saved as (defaults to ``name``).
    """
    _register(SAE_TRAINING_CLASS_REGISTRY, name, (sae_class, config_class))
    PLUGIN_TRAINING_ARCHITECTURES[name] = inference_architecture or name


def plugin_training_architectures() -> list[str]:
    """Names of the training architectures this package registers, sorted."""
    return sorted(PLUGIN_TRAINING_ARCHITECTURES)


def plugin_inference_architectures() -> list[str]:
    """Names of the inference architectures this package registers, sorted."""
    return sorted(PLUGIN_INFERENCE_ARCHITECTURES)
