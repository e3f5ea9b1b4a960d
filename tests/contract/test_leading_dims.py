"""Every plugin architecture accepts activations ``[..., d_in]`` with any leading dimensions.

SAELens's own SAEs do (a splice hands an SAE ``[batch, seq, d_in]``), and SAELens's
architecture-generic tests feed training SAEs such inputs too. For each registered plugin
training architecture and its saved inference SAE: ``encode`` / ``decode`` / ``forward`` /
``training_forward_pass`` on ``[batch, seq, d_in]`` give the same values as on the tokens
flattened to ``[batch·seq, d_in]``, with the leading dimensions restored.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput

from sae_ext.registry import plugin_training_architectures
from sae_ext.testing import small_training_config

ARCHITECTURES = plugin_training_architectures()
D_IN, D_SAE = 32, 128
LEAD = (3, 5)


def _make(arch: str) -> TrainingSAE:
    sae = get_sae_training_class(arch)[0](small_training_config(arch, d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():  # weights away from their inits, so every code path matters
        g = torch.Generator().manual_seed(0)
        for p in sae.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return sae


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(*LEAD, D_IN, generator=torch.Generator().manual_seed(1)) + 0.3
    return x, x.reshape(-1, D_IN)


def _step(sae: TrainingSAE, x: torch.Tensor) -> TrainStepInput:
    coefficients = {
        k: v.value if isinstance(v, TrainCoefficientConfig) else float(v) for k, v in sae.get_coefficients().items()
    }
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # dead-latent terms (AuxK, pre-activation loss, resets) run too
    return TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead, n_training_steps=0,
                          is_logging_step=True)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_sae_encode_decode_forward_accept_leading_dims(arch: str) -> None:
    sae = _make(arch)
    x, flat = _inputs()
    with torch.no_grad():
        f_flat = sae.encode(flat)
        y_flat = sae.decode(f_flat)
        f = sae.encode(x)
        y = sae.decode(f)  # encode/decode in pairs: the scaffold's pending s belongs to this input
        assert f.shape == (*LEAD, D_SAE) and y.shape == x.shape
        torch.testing.assert_close(f.reshape(-1, D_SAE), f_flat)
        torch.testing.assert_close(y.reshape(-1, D_IN), y_flat)
        torch.testing.assert_close(sae(x).reshape(-1, D_IN), sae(flat))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_forward_pass_accepts_leading_dims(arch: str) -> None:
    sae = _make(arch)
    twin = copy.deepcopy(sae)  # data-driven inits and running statistics start equal
    x, flat = _inputs()
    out, out_flat = sae.training_forward_pass(_step(sae, x)), twin.training_forward_pass(_step(twin, flat))
    assert out.sae_in.shape == x.shape and out.sae_out.shape == x.shape
    assert out.feature_acts.shape == (*LEAD, D_SAE) and out.hidden_pre.shape[:-1] == LEAD
    torch.testing.assert_close(out.feature_acts.reshape(-1, D_SAE), out_flat.feature_acts)
    torch.testing.assert_close(out.sae_out.reshape(-1, D_IN), out_flat.sae_out)
    assert out.losses.keys() == out_flat.losses.keys()
    for name, value in out.losses.items():
        torch.testing.assert_close(value, out_flat.losses[name], msg=name)
    out.loss.backward()
    out_flat.loss.backward()
    for (name, p), p_flat in zip(sae.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (p_flat.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_flat.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inference_sae_accepts_leading_dims(arch: str, tmp_path: Path) -> None:
    _make(arch).save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    x, flat = _inputs()
    with torch.no_grad():
        f_flat = sae.encode(flat)
        y_flat = sae.decode(f_flat)
        f = sae.encode(x)
        y = sae.decode(f)
        assert f.shape == (*LEAD, D_SAE) and y.shape == x.shape
        torch.testing.assert_close(f.reshape(-1, D_SAE), f_flat)
        torch.testing.assert_close(y.reshape(-1, D_IN), y_flat)
        torch.testing.assert_close(sae(x).reshape(-1, D_IN), sae(flat))
