"""Issue 10: one clear error per bad input, raised before any work (sae_ext.validation)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import pytest
import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer

from sae_ext.registry import PLUGIN_TRAINING_ARCHITECTURES, plugin_training_architectures
from sae_ext.saes.sasa import SASASAEConfig
from sae_ext.testing import small_training_config
from sae_ext.validation import (
    check_finite_inputs,
    check_finite_training_inputs,
    check_matryoshka_widths,
    finite_input_checks_enabled,
    finite_training_checks_enabled,
)

ARCHS = plugin_training_architectures()
D_IN, D_SAE = 32, 128


@pytest.fixture(autouse=True)
def _finite_checks_off() -> Iterator[None]:
    """Every test starts and ends with the process-wide switch in its default (off) state."""
    with check_finite_inputs(False):
        yield


def _training(arch: str, **kw) -> TrainingSAE:
    return get_sae_training_class(arch)[0](
        small_training_config(arch, d_in=D_IN, d_sae=D_SAE, **kw)
    )


def _inference(arch: str, **kw) -> SAE:
    """The inference SAE of ``arch`` (built from the training config's inference dict)."""
    cfg = small_training_config(arch, d_in=D_IN, d_sae=D_SAE, **kw).get_inference_sae_cfg_dict()
    return SAE.from_dict(cfg)


def _step(x: torch.Tensor, sae: TrainingSAE, step: int = 0) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={k: getattr(v, "value", v) for k, v in sae.get_coefficients().items()},
        dead_neuron_mask=torch.ones(sae.cfg.d_sae, dtype=torch.bool),  # all "dead": resets run
        n_training_steps=step,
        is_logging_step=True,
    )


def _with_pending_state_changes(sae: TrainingSAE) -> TrainingSAE:
    """Make every state change a training step starts with non-trivial.

    SA-GSAE: thresholds above ``initial_threshold`` (the dead-latent reset would lower them);
    SASA: decoder rows off unit norm (the per-step fold would rescale them); scaffold: the PCA
    init is pending anyway.
    """
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, sae.cfg.d_sae)[:, None].to(sae.W_dec))
        for name, p in sae.named_parameters():
            if name.startswith("threshold"):
                p.add_(1.0)
    return sae


def _snapshot(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def _assert_unchanged(sae: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = sae.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed although the call raised"


# --------------------------------------------------------------------------- width


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 33), (5, 31)])
def test_wrong_width_is_one_clear_error_in_every_encode(arch: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    pattern = rf"d_in = {D_IN}; got shape \({', '.join(map(str, shape))}\)"
    for sae in (_training(arch), _inference(arch)):
        with pytest.raises(ValueError, match=pattern):
            sae.encode(x)
        with pytest.raises(ValueError, match=pattern):
            sae(x)
    # the right width passes, with any number of leading dimensions
    assert _inference(arch).encode(torch.randn(2, 3, D_IN)).shape == (2, 3, D_SAE)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_width_in_training_raises_before_any_state_changes(arch: str) -> None:
    sae = _with_pending_state_changes(_training(arch))
    before = _snapshot(sae)
    with pytest.raises(ValueError, match=rf"d_in = {D_IN}; got shape \(64, 48\)"):
        sae.training_forward_pass(_step(torch.randn(64, 48), sae))
    _assert_unchanged(sae, before)  # no PCA init, no decoder fold, no threshold reset


@pytest.mark.parametrize("arch", ["scaffold_batchtopk", "scaffold_matryoshka_batchtopk"])
def test_pca_scaffold_init_needs_two_tokens(arch: str) -> None:
    sae = _training(arch)
    before = _snapshot(sae)
    with pytest.raises(ValueError, match=r"at least 2 tokens; got 1\. .*scaffold_init='random'"):
        sae.training_forward_pass(_step(torch.randn(1, D_IN), sae))
    _assert_unchanged(sae, before)
    _training(arch, scaffold_init="random").training_forward_pass(_step(torch.randn(1, D_IN), sae))


def test_group_and_scaffold_helpers_check_the_width_too() -> None:
    sasa = _inference("sasa")
    for fn in (sasa.group_codes, sasa.group_scores, sasa.active_groups):
        with pytest.raises(ValueError, match=rf"d_in = {D_IN}"):
            fn(torch.randn(3, 8))
    scaffold = _inference("scaffold_batchtopk")
    with pytest.raises(ValueError, match=rf"d_in = {D_IN}"):
        scaffold.scaffold(torch.randn(3, 8))


@pytest.mark.parametrize("inference_arch", sorted(set(PLUGIN_TRAINING_ARCHITECTURES.values())))
def test_hook_z_saes_check_the_flattened_head_width(inference_arch: str) -> None:
    arch = next(a for a, inf in PLUGIN_TRAINING_ARCHITECTURES.items() if inf == inference_arch)
    cfg = small_training_config(arch, d_in=D_IN, d_sae=D_SAE).get_inference_sae_cfg_dict()
    cfg["reshape_activations"] = "hook_z"
    sae = SAE.from_dict(cfg)
    assert sae.encode(torch.randn(2, 5, 4, 8)).shape == (2, 5, D_SAE)  # 4 heads x 8 = d_in
    assert sae(torch.randn(2, 5, 4, 8)).shape == (2, 5, 4, 8)
    with pytest.raises(ValueError, match=r"n_heads·d_head = d_in = 32; got shape \(2, 5, 4, 4\)"):
        sae.encode(torch.randn(2, 5, 4, 4))


# --------------------------------------------------------------------------- NaN / Inf


def _poisoned(n: int = 64, n_nan: int = 3, n_inf: int = 2) -> torch.Tensor:
    """``n`` random activations with ``n_nan`` NaNs and ``n_inf`` infinities (one of them −inf)."""
    x = torch.randn(n, D_IN)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))
    flat[idx[:n_nan]] = float("nan")
    flat[idx[n_nan : n_nan + n_inf]] = float("inf")
    flat[idx[n_nan]] = -float("inf")
    return x


@pytest.mark.parametrize("arch", ARCHS)
def test_non_finite_training_batch_names_step_and_count_and_changes_nothing(arch: str) -> None:
    sae = _with_pending_state_changes(_training(arch))
    before = _snapshot(sae)
    with pytest.raises(
        ValueError,
        match=rf"training step 7 \({arch} SAE\): 5 of {64 * D_IN} values are NaN or Inf "
        r"\(3 NaN, 2 Inf",
    ):
        sae.training_forward_pass(_step(_poisoned(), sae, step=7))
    _assert_unchanged(sae, before)
    # one NaN is enough, and the same holds in bfloat16
    x = torch.randn(16, D_IN, dtype=torch.bfloat16)
    x[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"training step 0 .*1 of 512 values"):
        sae.training_forward_pass(_step(x, sae))


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_stops_at_the_bad_step_with_the_last_good_weights(arch: str) -> None:
    sae = _training(arch)
    good = [torch.randn(64, D_IN) for _ in range(3)]

    def stream() -> Iterator[torch.Tensor]:
        yield from good
        yield _poisoned()
        raise AssertionError("the trainer must not ask for a batch after the bad one")

    cfg = SAETrainerConfig(
        total_training_samples=6 * 64, train_batch_size_samples=64, lr=1e-3, lr_end=1e-3
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=stream())
    with pytest.raises(ValueError, match=r"training step 3 \("):
        trainer.fit()
    assert trainer.n_training_steps == 3
    assert all(torch.isfinite(p).all() for p in sae.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_finite_check_is_opt_in(arch: str) -> None:
    sae = _inference(arch)
    x = _poisoned(8, n_nan=1, n_inf=1)
    assert not finite_input_checks_enabled()
    sae.encode(x)  # off by default: no check on the hot path, NaN simply propagates
    with check_finite_inputs():
        assert finite_input_checks_enabled()
        with pytest.raises(
            ValueError, match=r"non-finite input to this .* SAE: 2 of 256 values .*1 NaN, 1 Inf"
        ):
            sae.encode(x)
        with pytest.raises(ValueError, match="check_finite_inputs"):
            sae(x)
        sae.encode(torch.randn(8, D_IN))  # finite inputs pass
    assert not finite_input_checks_enabled()  # the context manager restored the setting
    check_finite_inputs(True)  # a plain call switches it on until switched off
    with pytest.raises(ValueError, match="2 of 256"):
        _training(arch).encode(x)
    check_finite_inputs(False)
    _training(arch).encode(x)


def test_check_finite_inputs_rejects_non_bools() -> None:
    with pytest.raises(TypeError, match="bool"):
        check_finite_inputs(1)  # type: ignore[arg-type]
    assert not finite_input_checks_enabled()


@pytest.mark.parametrize("arch", ARCHS)
def test_training_finite_check_is_automatic_per_device_and_can_be_forced(arch: str) -> None:
    """Default: CPU batches are checked, accelerator batches are not (a host sync per step);
    True / False force it on / off everywhere; None restores the automatic setting."""
    assert finite_training_checks_enabled("cpu") and not finite_training_checks_enabled("cuda")
    sae = _training(arch)
    sae.training_forward_pass(_step(torch.randn(64, D_IN), sae))  # one-time data inits done
    with check_finite_training_inputs(False):
        assert not finite_training_checks_enabled("cpu")
        out = sae.training_forward_pass(_step(_poisoned(), sae))  # not checked: NaN flows through
        assert not torch.isfinite(out.loss)
        with check_finite_training_inputs(True):
            assert finite_training_checks_enabled("cuda") and finite_training_checks_enabled("mps")
            with pytest.raises(ValueError, match="training step 0"):
                sae.training_forward_pass(_step(_poisoned(), sae))
        assert not finite_training_checks_enabled("cpu")  # the context manager restored it
    check_finite_training_inputs(True)  # a plain call sets it until set again
    try:
        assert finite_training_checks_enabled("cuda:0")
    finally:
        check_finite_training_inputs(None)
    assert finite_training_checks_enabled("cpu") and not finite_training_checks_enabled("cuda:0")
    with pytest.raises(TypeError, match="True, False or None"):
        check_finite_training_inputs(1)  # type: ignore[arg-type]
    assert finite_training_checks_enabled("cpu")


# --------------------------------------------------------------------------- configs


def _cfg(arch: str, **kw):
    return small_training_config(arch, d_in=D_IN, d_sae=D_SAE, **kw)


SCAFFOLDS = ["scaffold_batchtopk", "scaffold_matryoshka_batchtopk"]

CONFIG_ERRORS = [
    # BatchTopK k (SAELens checks none of these; k > d_sae used to fail deep inside topk)
    *[
        (a, {"k": k}, rf"0 < k <= d_sae = 128 .*got {re.escape(repr(k))}")
        for a in SCAFFOLDS
        for k in (0, -1, 129, 1e9, True, math.nan, "4")
    ],
    *[
        (a, {"topk_threshold_lr": v}, rf"topk_threshold_lr must be a number in \[0, 1\]; got {v}")
        for a in SCAFFOLDS
        for v in (-0.1, 1.5)
    ],
    # scaffold rank (already checked before issue 10)
    *[
        (a, {"scaffold_rank": r}, rf"1\.\.31 for d_in = 32\); got {r}")
        for a in SCAFFOLDS
        for r in (0, 32)
    ],
    # SASA group shape
    ("sasa", {"group_rank": 0}, r"group_rank must be an integer >= 1; got 0"),
    ("sasa", {"group_rank": 3}, r"d_sae=128 must be a multiple of group_rank=3"),
    ("sasa", {"n_active_groups": 0}, r"n_active_groups must be an integer in \[1, 32\]; got 0"),
    ("sasa", {"n_active_groups": 33}, r"n_active_groups must be an integer in \[1, 32\]; got 33"),
    ("sasa", {"aux_k_groups": 33}, r"aux_k_groups must be an integer in \[1, 32\]; got 33"),
    # SA-GSAE thresholds
    (
        "sign_aware_gated",
        {"initial_threshold": -1e-3},
        r"initial_threshold must be a finite number >= 0 or 'auto', got -0\.001",
    ),
    (
        "sign_aware_gated",
        {"initial_threshold": math.inf},
        r"initial_threshold must be a finite number >= 0 or 'auto', got inf",
    ),
    ("sign_aware_gated", {"bandwidth": 0}, r"bandwidth must be a finite number > 0, got 0"),
    ("sign_aware_gated", {"l0_coefficient": -1.0}, r"l0_coefficient must be a finite number >= 0, got -1\.0"),
    (
        "sign_aware_gated",
        {"sparsity_loss_mode": "quadratic"},
        r"target_l0 must be set when sparsity_loss_mode='quadratic'",
    ),
    # Matryoshka widths
    (
        "scaffold_matryoshka_batchtopk",
        {"matryoshka_widths": [64, 32, 128]},
        r"got \[64, 32, 128\] \(not increasing at 64 -> 32\)",
    ),
    (
        "scaffold_matryoshka_batchtopk",
        {"matryoshka_widths": [16, 16, 128]},
        r"not increasing at 16 -> 16",
    ),
    (
        "scaffold_matryoshka_batchtopk",
        {"matryoshka_widths": [16, 64]},
        r"ending at d_sae = 128 .*append d_sae: \[16, 64, 128\]",
    ),
    (
        "scaffold_matryoshka_batchtopk",
        {"matryoshka_widths": [16, 256]},
        r"larger than d_sae: \[256\]",
    ),
    (
        "scaffold_matryoshka_batchtopk",
        {"matryoshka_widths": [0, 128]},
        r"not positive integers: \[0\]",
    ),
    (
        "scaffold_matryoshka_batchtopk",
        {"matryoshka_widths": [16.0, 128]},
        r"not positive integers: \[16\.0\]",
    ),
]


@pytest.mark.parametrize(("arch", "kwargs", "match"), CONFIG_ERRORS)
def test_impossible_config_is_one_clear_error(arch: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(arch, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"k": 128}, {"k": 0.5}, {"k": 2.5}, {"topk_threshold_lr": 0.0}, {"topk_threshold_lr": 1.0}],
)
@pytest.mark.parametrize("arch", SCAFFOLDS)
def test_boundary_configs_are_accepted(arch: str, kwargs: dict) -> None:
    cfg = _cfg(arch, **kwargs)
    get_sae_training_class(arch)[0](cfg)


def test_inference_sasa_config_checks_the_group_shape_too() -> None:
    with pytest.raises(ValueError, match=r"n_active_groups must be an integer in \[1, 8\]; got 9"):
        SASASAEConfig(d_in=D_IN, d_sae=32, group_rank=4, n_active_groups=9)
    with pytest.raises(ValueError, match=r"must be a multiple of group_rank=5"):
        get_sae_class("sasa")[1](d_in=D_IN, d_sae=32, group_rank=5, n_active_groups=1)


def test_saelens_matryoshka_messages_are_what_ours_replace() -> None:
    """SAELens's own check (at SAE construction) does not name the widths: that is why ours exists."""
    cfg_cls = get_sae_training_class("matryoshka_batchtopk")
    with pytest.raises(ValueError) as info:
        cfg_cls[0](cfg_cls[1](d_in=D_IN, d_sae=D_SAE, k=4, matryoshka_widths=[64, 32, 128]))
    assert "64" not in str(info.value)
    with pytest.warns(UserWarning, match="final matryoshka level"):
        cfg_cls[0](cfg_cls[1](d_in=D_IN, d_sae=D_SAE, k=4, matryoshka_widths=[16, 64]))
    # ours, on the same inputs
    with pytest.raises(ValueError, match=r"\[64, 32, 128\]"):
        check_matryoshka_widths([64, 32, 128], D_SAE)
    with pytest.raises(ValueError, match=r"\[16, 64, 128\]"):
        check_matryoshka_widths([16, 64], D_SAE)
    check_matryoshka_widths([16, 64, 128], D_SAE)
    check_matryoshka_widths((128,), D_SAE)


# --------------------------------------------------------------------------- hook names

BAD_HOOK = "blocks.0.hook_resid_pots"


def _hook_entry_points():
    """Every public capture/splicing function that takes a hook name, called with ``BAD_HOOK``."""
    from sae_ext import capture, interventions, model_io, saelens_evals

    def sae():  # an SAE whose saved hook name is the bad one
        s = _inference("sign_aware_gated")
        s.cfg.metadata.hook_name = BAD_HOOK
        return s

    toks = torch.randint(1, 97, (2, 8))
    w = torch.zeros(D_IN, D_IN)
    return {
        "check_hook_name": lambda m: capture.check_hook_name(m, BAD_HOOK),
        "hook_width": lambda m: capture.hook_width(m, BAD_HOOK),
        "run_spliced": lambda m: interventions.run_spliced(m, sae(), toks),
        "splice_ce": lambda m: interventions.splice_ce(m, sae(), toks, progress=False),
        "dark_matter_ce": lambda m: interventions.dark_matter_ce(m, sae(), toks, w, progress=False),
        "mean_sae_error": lambda m: interventions.mean_sae_error(m, sae(), toks, progress=False),
        "error_node_ablation": lambda m: interventions.error_node_ablation(
            m, sae(), toks, progress=False
        ),
        "ablate_hook": lambda m: interventions.ablate_hook(
            m, sae(), toks, "hook_sae_acts_post", progress=False
        ),
        "iter_activations": lambda m: next(model_io.iter_activations(m, BAD_HOOK, toks)),
        "remove_directions_ce": lambda m: interventions.remove_directions_ce(
            m, BAD_HOOK, torch.eye(D_IN)[:, :2], toks, progress=False
        ),
        "make_activations_store": lambda m: saelens_evals.make_activations_store(m, sae(), toks),
        "loss_recovered": lambda m: saelens_evals.loss_recovered(m, sae(), toks),
    }


@pytest.mark.parametrize("entry", sorted(_hook_entry_points()))
def test_unknown_hook_name_lists_close_names_in_every_entry_point(entry: str, tiny_model) -> None:
    with pytest.raises(
        ValueError,
        match=rf"unknown hook name '{re.escape(BAD_HOOK)}'.*closest valid names: .*blocks\.0\.hook_resid_post",
    ):
        _hook_entry_points()[entry](tiny_model)
