"""SAE architectures. Each module registers its classes with SAELens when imported; importing
this package imports every one of them, by name (a new architecture module is added here)."""

from sae_ext.saes import sasa, sasa_batchtopk, scaffold, sign_aware_gated

__all__ = ["sasa", "sasa_batchtopk", "scaffold", "sign_aware_gated"]
