"""Constructed SAEs for the metric tests: SAELens built-ins with hand-set weights, plus a
duck-typed stand-in for cases no deterministic SAE can produce (independent noise)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig


class FunctionSAE:
    """Minimal SAE interface (``cfg.d_in``/``d_sae``, ``encode``, ``decode``) around ``x -> SAE(x)``.

    ``encode`` is the identity, so the "latents" are the input itself; only dark-matter tests,
    which need arbitrary reconstructions, use it.
    """

    def __init__(self, d_in: int, reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.cfg = SimpleNamespace(d_in=d_in, d_sae=d_in)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._reconstruct = reconstruct

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._reconstruct(z)


def standard_sae(
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    apply_b_dec_to_input: bool = False,
) -> StandardSAE:
    """A SAELens ``StandardSAE`` (ReLU) with the given weights."""
    d_in, d_sae = W_enc.shape
    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec_to_input)
    )
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
    return sae


@pytest.fixture
def function_sae() -> type[FunctionSAE]:
    return FunctionSAE


@pytest.fixture
def make_standard_sae() -> Callable[..., StandardSAE]:
    return standard_sae
