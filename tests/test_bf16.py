"""Issue 10: every plugin architecture trains in bfloat16 (SAE ``dtype="bfloat16"``) without NaN.

A short run through SAELens's ``SAETrainer`` on synthetic sparse activations, checked step by
step, and compared with the same run in float32. The 200-step run on real model activations
is ``benchmarks/bf16_200_steps.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_ext.loading import load_sae
from sae_ext.registry import plugin_training_architectures
from sae_ext.testing import small_training_config

ARCHS = plugin_training_architectures()
D_IN, D_SAE, K = 32, 128, 4
STEPS, BATCH = 30, 128
#: tensors that keep their own precision in a bf16 SAE
OWN_DTYPE = {
    "threshold_pos": torch.float32,  # SA-GSAE thresholds: float32 whatever the SAE dtype
    "threshold_neg": torch.float32,
    "data_initialized": torch.bool,  # SA-GSAE: b_dec already set from the first batch
    "topk_threshold": torch.float64,  # SAELens BatchTopK keeps it in float64
    "scaffold_initialized": torch.bool,
    "dense_window_counts": torch.int64,
    "dense_window_tokens": torch.int64,
}


def _stream(batch: int) -> Iterator[torch.Tensor]:
    """Sparse non-negative combinations of 64 unit directions, plus an offset, at norm ~5."""
    g = torch.Generator().manual_seed(3)
    dirs = torch.nn.functional.normalize(torch.randn(64, D_IN, generator=g), dim=-1)
    while True:
        mask = torch.rand(batch, 64, generator=g) < 0.05
        yield ((mask * (torch.rand(batch, 64, generator=g) * 2 + 0.5)) @ dirs + 0.1) * 3


def _train(arch: str, dtype: str) -> tuple[TrainingSAE, list[TrainStepOutput]]:
    torch.manual_seed(0)
    cfg = small_training_config(arch, d_in=D_IN, d_sae=D_SAE, dtype=dtype)
    sae = get_sae_training_class(arch)[0](cfg)
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=STEPS * BATCH,
            train_batch_size_samples=BATCH,
            lr=3e-3,
            lr_end=3e-3,
            dead_feature_window=10,  # AuxK / threshold resets run in the second half
            feature_sampling_window=1000,
        ),
        sae=sae,
        data_provider=_stream(BATCH),
    )
    outputs: list[TrainStepOutput] = []
    step = trainer.step

    def recording_step(batch: torch.Tensor) -> TrainStepOutput:
        out = step(batch)
        outputs.append(out)
        return out

    trainer.step = recording_step  # type: ignore[method-assign]
    trainer.fit()
    return sae, outputs


def _mse(outputs: list[TrainStepOutput], steps: slice) -> float:
    return sum(o.losses["mse_loss"].item() for o in outputs[steps]) / len(outputs[steps])


Runs = dict[tuple[str, str], tuple[TrainingSAE, list[TrainStepOutput]]]


@pytest.fixture(scope="module")
def runs() -> Runs:
    """Each (architecture, dtype) run is trained once and shared by the tests below."""
    return {}


def _run(runs: Runs, arch: str, dtype: str) -> tuple[TrainingSAE, list[TrainStepOutput]]:
    if (arch, dtype) not in runs:
        runs[arch, dtype] = _train(arch, dtype)
    return runs[arch, dtype]


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_training_has_no_nan_and_keeps_its_dtypes(arch: str, runs: Runs) -> None:
    sae, outputs = _run(runs, arch, "bfloat16")
    assert len(outputs) == STEPS
    for i, out in enumerate(outputs):
        assert out.sae_out.dtype == torch.bfloat16, i
        for name, t in {
            "loss": out.loss,
            "sae_out": out.sae_out,
            "feature_acts": out.feature_acts,
        }.items():
            assert torch.isfinite(t).all(), f"step {i}: non-finite {name}"
        for name, loss in out.losses.items():
            assert torch.isfinite(torch.as_tensor(loss)).all(), f"step {i}: non-finite {name}"
    for name, t in sae.state_dict().items():
        assert t.dtype == OWN_DTYPE.get(name, torch.bfloat16), name
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_sparsity_is_exact_on_every_step(arch: str, runs: Runs) -> None:
    sae, outputs = _run(runs, arch, "bfloat16")
    for i, out in enumerate(outputs):
        l0 = (out.feature_acts != 0).sum(-1)
        if arch.startswith("scaffold"):
            assert l0.double().mean().item() == K, i  # BatchTopK: mean L0 == k over the batch
        elif arch == "sasa":
            groups = sae.group_acts(out.feature_acts) != 0
            assert (groups.any(-1).sum(-1) == sae.cfg.n_active_groups).all(), i
            assert (l0 <= sae.cfg.n_active_groups * sae.cfg.group_rank).all(), i
        elif arch == "sasa_batchtopk":  # s groups a token on average over the batch
            groups = sae.group_acts(out.feature_acts) != 0
            assert groups.any(-1).sum().item() == sae.cfg.n_active_groups * l0.numel(), i
        else:
            assert 0 < l0.double().mean().item() < D_SAE, i  # neither dead nor saturated


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_learns_like_float32(arch: str, runs: Runs) -> None:
    _, bf16 = _run(runs, arch, "bfloat16")
    _, fp32 = _run(runs, arch, "float32")
    first, last = slice(0, 3), slice(-5, None)
    assert _mse(bf16, last) < 0.9 * _mse(bf16, first)  # it trains
    assert _mse(bf16, last) < 1.1 * _mse(fp32, last)  # about as well as float32


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_sae_saves_and_loads_for_inference(arch: str, runs: Runs, tmp_path: Path) -> None:
    sae, _ = _run(runs, arch, "bfloat16")
    sae.save_inference_model(tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.dtype == torch.bfloat16 and loaded.W_dec.dtype == torch.bfloat16
    if arch == "sign_aware_gated":
        assert loaded.threshold_pos.dtype == torch.float32
    x = next(_stream(64))
    with torch.no_grad():
        y = loaded(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    fvu = ((y.float() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu < 1.0
