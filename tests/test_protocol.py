"""SPEC §8 on every training path: a tiny model whose BOS activation is a huge outlier proves that
special tokens stay out of training batches, the norm estimate and the scaffold's PCA init, and
that the dead-feature window is sized so AuxK acts in a short run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKTrainingSAE
from sae_lens.training.activation_scaler import ActivationScaler

from sae_ext.capture import capture_activations, checkpoint_dirs, load_checkpoint, train_on_cache
from sae_ext.cli import train_config
from sae_ext.model_io import special_token_ids
from sae_ext.protocol import (
    apply_protocol,
    dead_feature_window,
    default_training_tokens,
    is_converged,
    lr_schedule,
    resolve_special_tokens,
    total_steps,
)
from sae_ext.testing import small_training_config, tiny_hooked_transformer

HOOK = "blocks.0.hook_resid_post"
BOS = 0
BOS_SCALE = 300.0


@pytest.fixture(scope="module")
def bos_model():
    """A tiny model whose BOS (id 0) residual is ~300× the other tokens' (an attention-sink outlier)."""
    model = tiny_hooked_transformer()
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.embed.W_E[BOS] *= BOS_SCALE
    return model


@pytest.fixture(scope="module")
def bos_rows() -> Dataset:
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, 97, (64, 16), generator=g)
    toks[:, 0] = BOS
    return Dataset.from_dict({"input_ids": toks.tolist()})


@pytest.fixture(scope="module")
def bos_cache(bos_model, bos_rows, tmp_path_factory):
    return capture_activations(bos_model, bos_rows, HOOK, tmp_path_factory.mktemp("c") / "cap")


def _norms(cache) -> tuple[torch.Tensor, torch.Tensor]:
    x, ids = cache.activations(), cache.token_ids()
    return x[ids == BOS].norm(dim=-1), x[ids != BOS].norm(dim=-1)


def test_capture_keeps_every_position_and_its_token_id(bos_cache) -> None:
    bos, other = _norms(bos_cache)
    assert bos.numel() == 64 and other.numel() == 64 * 15
    assert bos.min() > 20 * other.max()  # the outlier really is one


def _train(cache, model, rows, tmp: Path, arch: str = "topk", **kw):
    return train_on_cache(
        small_training_config(arch, d_in=32, d_sae=64, normalize_activations="expected_average_only_in"),
        cache, model, rows, tmp,
        training_tokens=kw.pop("training_tokens", 1024), train_batch_size_tokens=64, lr=kw.pop("lr", 1e-3),
        n_batches_for_norm_estimate=4, **kw,
    )


@pytest.mark.parametrize("exclude", [[BOS], False])
def test_special_tokens_stay_out_of_batches_and_norm_estimate(
    bos_cache, bos_model, bos_rows, tmp_path, monkeypatch, exclude
) -> None:
    seen: list[float] = []
    factors: list[float] = []
    forward = TopKTrainingSAE.training_forward_pass
    estimate = ActivationScaler.estimate_scaling_factor

    def record_batch(self, step_input):
        seen.append(float(step_input.sae_in.norm(dim=-1).max()))
        return forward(self, step_input)

    def record_factor(self, *args, **kwargs):
        estimate(self, *args, **kwargs)
        factors.append(self.scaling_factor)

    monkeypatch.setattr(TopKTrainingSAE, "training_forward_pass", record_batch)
    monkeypatch.setattr(ActivationScaler, "estimate_scaling_factor", record_factor)
    _train(bos_cache, bos_model, bos_rows, tmp_path, exclude_special_tokens=exclude)
    bos, other = _norms(bos_cache)
    clean_factor = 32**0.5 / float(other.mean())
    (factor,) = factors
    # batches are normalised by the factor: compare in activation units
    batch_max = max(seen) / factor
    if exclude:
        assert batch_max <= float(other.max()) * 1.001
        assert factor == pytest.approx(clean_factor, rel=0.1)
    else:  # the control: without the protocol BOS reaches both, so the checks above can fail
        assert batch_max > 10 * float(other.max())
        assert factor < 0.5 * clean_factor


@pytest.mark.parametrize("exclude", [[BOS], False])
def test_scaffold_pca_init_never_sees_bos(bos_cache, bos_model, bos_rows, tmp_path, exclude) -> None:
    bos_dir = bos_cache.activations()[bos_cache.token_ids() == BOS][0]
    bos_dir = bos_dir / bos_dir.norm()
    _train(bos_cache, bos_model, bos_rows, tmp_path, "scaffold_batchtopk", training_tokens=64, lr=1e-9,
           exclude_special_tokens=exclude)
    sae = SAE.load_from_disk(tmp_path)
    basis = torch.linalg.qr(sae.scaffold_subspace().float())[0]  # [d_in, r]
    overlap = float((basis.T @ bos_dir).norm())  # |cos| of BOS with the scaffold's span
    if exclude:
        assert overlap < 0.5
    else:
        assert overlap > 0.9


@pytest.mark.parametrize("window", [None, 10_000])
def test_dead_window_is_sized_so_auxk_fires_in_a_short_run(
    bos_cache, bos_model, bos_rows, tmp_path, monkeypatch, window
) -> None:
    aux: list[float] = []
    calc = TopKTrainingSAE.calculate_topk_aux_loss

    def record(self, *args, **kwargs):
        loss = calc(self, *args, **kwargs)
        aux.append(float(loss))
        return loss

    monkeypatch.setattr(TopKTrainingSAE, "calculate_topk_aux_loss", record)
    cfg = small_training_config("topk", d_in=32, d_sae=512, k=2)
    train_on_cache(cfg, bos_cache, bos_model, bos_rows, tmp_path, training_tokens=64 * 60,
                   train_batch_size_tokens=64, lr=1e-3, exclude_special_tokens=[BOS],
                   dead_feature_window=window)
    recorded = (tmp_path / "sae_ext_protocol.json").read_text()
    if window is None:
        assert '"dead_feature_window": 6' in recorded  # 10 % of 60 steps
        assert max(aux) > 0
    else:  # SAELens-style long window: AuxK never acts, which is what the sizing prevents
        assert '"dead_feature_window": 10000' in recorded
        assert max(aux) == 0


def test_half_budget_checkpoint_loads_as_an_inference_sae(bos_cache, bos_model, bos_rows, tmp_path) -> None:
    _train(bos_cache, bos_model, bos_rows, tmp_path, "batchtopk", exclude_special_tokens=[BOS], n_checkpoints=1)
    ((tokens, ckpt),) = checkpoint_dirs(tmp_path).items()
    assert 512 < tokens < 1024  # the first step past half of the 1024-token budget
    half, full = load_checkpoint(ckpt), SAE.load_from_disk(tmp_path)
    assert type(half) is type(full) and half.cfg.architecture() == "jumprelu"
    x = bos_cache.activations()[bos_cache.token_ids() != BOS][:64]
    assert not torch.allclose(half(x), full(x))  # a different point of the same run
    assert float(((half(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()) < 1.5  # a working SAE
    assert not (tmp_path / ".checkpoints").exists()
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    assert checkpoint_dirs(tmp_path / "nothing") == {}


def test_no_tokenizer_needs_explicit_ids(bos_cache, bos_model, bos_rows, tmp_path) -> None:
    with pytest.raises(ValueError, match="list of ints"):
        _train(bos_cache, bos_model, bos_rows, tmp_path)
    assert not tmp_path.joinpath("sae_ext_protocol.json").exists()
    assert special_token_ids(bos_model) == ()


def test_special_ids_of_a_tokenizer() -> None:
    from sae_ext.testing import tiny_bridge

    bridge = tiny_bridge()
    assert special_token_ids(bridge) == (0,)
    assert resolve_special_tokens(bridge, True) == [0]
    assert resolve_special_tokens(bridge, [5, 3, 5]) == [3, 5]
    assert resolve_special_tokens(bridge, False) is False
    for bad in ([-1], ["a"], 3, [True]):
        with pytest.raises(ValueError, match="exclude_special_tokens"):
            resolve_special_tokens(bridge, bad)


def test_dead_window_sizing() -> None:
    assert total_steps(1000, 100) == 10 and total_steps(1001, 100) == 11
    assert dead_feature_window(150_000, 1024) == 14  # the v1 demo: 147 steps
    assert dead_feature_window(3_000_000, 1024) == 293
    assert dead_feature_window(100, 100) == 1
    assert dead_feature_window(3_000_000, 1024, requested=50) == 50
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="dead_feature_window"):
            dead_feature_window(1000, 10, requested=bad)
    with pytest.raises(ValueError, match="training_tokens"):
        dead_feature_window(0, 10)


def test_convergence_criterion() -> None:
    assert is_converged(0.656, 0.664) and not is_converged(0.604, 0.634)
    assert is_converged(0.60, 0.604, tolerance=0.005) and not is_converged(0.60, 0.61, tolerance=0.005)
    with pytest.raises(ValueError, match="finite"):
        is_converged(float("nan"), 0.5)
    with pytest.raises(ValueError, match="tolerance"):
        is_converged(0.5, 0.5, tolerance=0)


def test_default_training_tokens_by_hook_kind() -> None:
    assert default_training_tokens("blocks.15.hook_resid_mid") == default_training_tokens("blocks.3.hook_resid_post")
    assert default_training_tokens("blocks.15.hook_resid_mid") < default_training_tokens("blocks.15.hook_attn_out")
    assert default_training_tokens("blocks.15.hook_resid_mid") < default_training_tokens("blocks.15.hook_mlp_out")
    # a kind the table never measured gets the slowest measured budget
    assert default_training_tokens("blocks.0.attn.hook_z") == default_training_tokens("blocks.15.hook_mlp_out")
    with pytest.raises(ValueError, match="hook name"):
        default_training_tokens("")


def test_sae_ext_train_applies_the_protocol_unless_flags_say_otherwise() -> None:
    base = ["--architecture", "topk", "--model_name", "tiny", "--hook_name", HOOK, "--d_in", "32",
            "--d_sae", "64", "--training_tokens", "102400", "--train_batch_size_tokens", "1024"]
    cfg = train_config(base)
    assert cfg.exclude_special_tokens is True and cfg.dead_feature_window == 10
    assert (cfg.lr_warm_up_steps, cfg.lr_decay_steps) == (1, 20)
    cfg = train_config([*base, "--dead_feature_window", "40", "--exclude_special_tokens", "False",
                        "--lr_decay_steps", "0"])
    assert cfg.exclude_special_tokens is False and cfg.dead_feature_window == 40
    assert (cfg.lr_warm_up_steps, cfg.lr_decay_steps) == (0, 0)


def test_apply_protocol_widens_the_sampling_window() -> None:
    class Cfg:
        training_tokens, train_batch_size_tokens = 10**7, 1000
        dead_feature_window, feature_sampling_window, exclude_special_tokens = 1000, 500, False

        lr_warm_up_steps, lr_decay_steps = 0, 0

    cfg = apply_protocol(Cfg(), exclude_special_tokens=[7])
    assert cfg.dead_feature_window == 1000 and cfg.feature_sampling_window == 1000
    assert cfg.exclude_special_tokens == [7]


def test_lr_schedule_is_set_unless_the_user_chose_one() -> None:
    class Cfg:
        training_tokens, train_batch_size_tokens = 1_024_000, 1024
        dead_feature_window, feature_sampling_window, exclude_special_tokens = 1000, 2000, False
        lr_warm_up_steps, lr_decay_steps = 0, 0

    assert lr_schedule(1_024_000, 1024) == {"lr_warm_up_steps": 10, "lr_decay_steps": 200}
    cfg = apply_protocol(Cfg(), exclude_special_tokens=False)
    assert (cfg.lr_warm_up_steps, cfg.lr_decay_steps) == (10, 200)
    mine = Cfg()
    mine.lr_decay_steps = 5
    cfg = apply_protocol(mine, exclude_special_tokens=False)
    assert (cfg.lr_warm_up_steps, cfg.lr_decay_steps) == (0, 5)  # the user's schedule is kept
    cfg = apply_protocol(Cfg(), exclude_special_tokens=False, schedule=False)
    assert (cfg.lr_warm_up_steps, cfg.lr_decay_steps) == (0, 0)  # constant lr on request


def test_massive_token_mask_marks_attention_sink_norms_only() -> None:
    from sae_ext.protocol import MASSIVE_NORM_FACTOR, massive_token_mask

    torch.manual_seed(0)
    x = torch.randn(200, 16)
    x[7] *= 1000.0  # an attention-sink norm
    x[9] *= 0.5 * MASSIVE_NORM_FACTOR  # large, but under the factor × median
    mask = massive_token_mask(x)
    assert mask.tolist() == [i == 7 for i in range(200)]
    assert massive_token_mask(x, factor=2.0).sum() >= 2
    with pytest.raises(ValueError, match="factor"):
        massive_token_mask(x, factor=1.0)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        massive_token_mask(torch.randn(16))
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        massive_token_mask(x)
