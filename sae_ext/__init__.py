"""sae_ext: new SAE architectures and SAE-analysis metrics for SAELens.

``import sae_ext`` registers every architecture of this package with SAELens's training and
inference registries, so ``SAE.load_from_disk`` and ``LanguageModelSAERunnerConfig`` accept
their names. Import it before loading a saved plugin SAE.
"""

from sae_ext import saes  # noqa: F401  (registers the architectures)
from sae_ext.activations import BiJumpReLU
from sae_ext.loading import load_sae
from sae_ext.registry import plugin_inference_architectures, plugin_training_architectures

__version__ = "0.1.0"

__all__ = [
    "BiJumpReLU",
    "__version__",
    "load_sae",
    "plugin_inference_architectures",
    "plugin_training_architectures",
]
