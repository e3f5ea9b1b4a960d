"""CUDA readiness (issue 22): every plugin training architecture and its SAELens sibling on
one device, in one command, with a pass/fail record per check.

Per architecture (plugin architectures from ``sae_ext.registry``, each with its SAELens
sibling), at a small shape, training through SAELens's own ``SAETrainer``:

- ``train_fp32`` / ``train_bf16_autocast``: forward, backward and Adam step (the trainer's
  ``autocast`` flag for bf16); losses, parameters and logging-step metrics finite, the
  encoder and decoder moved, every parameter, buffer and output on the device; threshold
  tensors stay float32 under autocast.
- ``thresholds_bf16_sae`` (plugin only): an SAE built in bfloat16 keeps its threshold tensors
  (any state tensor named ``*threshold*``) at least float32 after training, after
  ``.to(torch.bfloat16)`` and in the saved inference SAE loaded in bfloat16.
- ``save_load``: inference SAE saved, loaded onto the device, saved and loaded again gives the
  same outputs; the training checkpoint round trip too.
- ``fold_W_dec_norm``: folding the decoder norms keeps the outputs (decoder rows rescaled first).
- ``splice_error_term``: spliced into a tiny ``HookedSAETransformer`` on the device with the
  error term, the logits equal the clean ones (and differ without it).
- ``metrics`` (plugin only): ``sae_ext.evaluate.evaluate_sae`` on the device (SAELens
  ``run_evals``, dark matter, dictionary statistics, error-node and scaffold ablations).
- ``step_time`` (plugin only): the SAELens trainer step against the sibling's at d_in 2048,
  d_sae 16384, batch 4096 under bf16 autocast, with achieved FLOP/s as a share of the bf16
  matmul peak (``--peak-flops``), and the cost of forcing the training NaN/Inf check on.
- ``compile``: ``torch.compile`` of ``training_forward_pass`` inside the same trainer, losses
  equal to eager; graphs and graph breaks of the first step counted (dynamo's
  ``ExplainWithBackend`` around the backend), and with the NaN/Inf check forced on
  (``torch._dynamo.explain``).

On CUDA the per-step host synchronisations of each architecture are also listed
(``torch.cuda.set_sync_debug_mode``). Output: ``gpu_check.json`` and ``gpu_check.md`` in
``--out``, rewritten after every check (a run cut short still leaves its records). Exit
status 1 if any check failed.

    python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check  # <= 8 min, one H100/H200
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check           # dry run

``--quick`` uses tiny shapes everywhere (the step-time table then reports ratios only) and
makes the compile check one traced step without the forced-on NaN-check variant. On a CPU the
compile check uses dynamo's ``eager`` backend by default: graph capture and graph-break count
without Inductor's code generation (which needs a C++ toolchain and minutes of CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, HookedSAETransformer, TrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, get_sae_training_class
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from sae_lens.training import sae_trainer as _sae_trainer_module
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

import sae_ext
from sae_ext.evaluate import evaluate_sae
from sae_ext.loading import load_sae
from sae_ext.registry import plugin_training_architectures
from sae_ext.testing import random_token_dataset, tiny_hooked_transformer
from sae_ext.validation import check_finite_training_inputs

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_check"
#: dense bf16 matmul peak of an H100/H200-class GPU (FLOP/s), the default of ``--peak-flops``
DEFAULT_PEAK_FLOPS = 790e12
HOOK = "blocks.0.hook_resid_post"
#: plugin architectures whose sibling is not the SAELens architecture their name ends with
SIBLING_OVERRIDES = {"sign_aware_gated": "gated", "sasa": "topk"}
#: SASA-style configs: columns per group
GROUP_RANK = 4
CHECK_ORDER = (
    "train_fp32",
    "train_bf16_autocast",
    "thresholds_bf16_sae",
    "save_load",
    "fold_W_dec_norm",
    "splice_error_term",
    "metrics",
    "step_time",
    "compile",
)
PLUGIN_ONLY = ("thresholds_bf16_sae", "metrics", "step_time")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of one run: the correctness checks, the step-time table and the evaluation."""

    d_in: int
    d_sae: int
    batch: int
    k: int
    steps: int
    speed_d_in: int
    speed_d_sae: int
    speed_batch: int
    speed_k: int
    warmup: int
    reps: int
    eval_tokens: int


FULL = Sizes(64, 512, 1024, 16, 20, 2048, 16384, 4096, 64, 3, 20, 2048)
QUICK = Sizes(32, 128, 64, 4, 3, 32, 256, 128, 8, 1, 4, 96)


class CheckFailed(Exception):
    """A check's assertion failed; ``details`` go into the record."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


def require(condition: bool, message: str, **details: Any) -> None:
    """Raise :class:`CheckFailed` with ``message`` unless ``condition``."""
    if not condition:
        raise CheckFailed(message, details)


# --------------------------------------------------------------------------- architectures


def sibling_of(arch: str) -> str:
    """The SAELens architecture a plugin architecture is compared with.

    An explicit override, else the longest SAELens-native training architecture that the name
    ends with (``scaffold_matryoshka_batchtopk`` → ``matryoshka_batchtopk``), else ``standard``.
    """
    if arch in SIBLING_OVERRIDES:
        return SIBLING_OVERRIDES[arch]
    plugin = set(plugin_training_architectures())
    native = [n for n in SAE_TRAINING_CLASS_REGISTRY if n not in plugin]
    matches = [n for n in native if arch.endswith("_" + n)]
    return max(matches, key=len) if matches else "standard"


def sae_kwargs(arch: str, d_in: int, d_sae: int, k: int) -> dict[str, Any]:
    """Config fields for ``arch`` at this shape and sparsity, set by field name.

    ``k`` for the TopK family, ``n_active_groups = k / GROUP_RANK`` for grouped SAEs (same
    active columns), three Matryoshka levels; everything else keeps the architecture's defaults.
    """
    fields = {f.name for f in dataclasses.fields(get_sae_training_class(arch)[1])}
    kwargs: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae}
    if "k" in fields:
        kwargs["k"] = k
    if {"group_rank", "n_active_groups"} <= fields:
        kwargs["group_rank"] = GROUP_RANK
        kwargs["n_active_groups"] = max(1, k // GROUP_RANK)
    if "matryoshka_widths" in fields:
        kwargs["matryoshka_widths"] = [d_sae // 16, d_sae // 4, d_sae]
    return kwargs


def make_sae(
    arch: str, sizes: tuple[int, int, int], device: str, *, dtype: str = "float32", seed: int = 0
) -> TrainingSAE[Any]:
    """A fresh training SAE of ``arch`` built on ``device`` (same seed, same weights)."""
    d_in, d_sae, k = sizes
    sae_cls, cfg_cls = get_sae_training_class(arch)
    torch.manual_seed(seed)
    return sae_cls(cfg_cls(**sae_kwargs(arch, d_in, d_sae, k), device=device, dtype=dtype))


def sparse_activations(n: int, d_in: int, device: str, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative combinations of random unit directions plus an offset (float32)."""
    g = torch.Generator().manual_seed(seed)
    n_feats = 2 * d_in
    dirs = torch.nn.functional.normalize(torch.randn(n_feats, d_in, generator=g), dim=-1)
    mask = torch.rand(n, n_feats, generator=g) < 0.05
    mags = torch.rand(n, n_feats, generator=g) * 2 + 0.5
    return ((mask * mags) @ dirs + 0.1).to(device)


def threshold_dtypes(module: torch.nn.Module) -> dict[str, str]:
    """dtype of every state tensor whose name contains ``threshold``."""
    return {n: str(t.dtype) for n, t in module.state_dict().items() if "threshold" in n}


def narrow(dtypes: dict[str, str]) -> dict[str, str]:
    """The entries of :func:`threshold_dtypes` below 32 bits."""
    return {n: d for n, d in dtypes.items() if d in ("torch.bfloat16", "torch.float16")}


def off_device(module: torch.nn.Module, device: str) -> list[str]:
    """Names of parameters and buffers not on ``device``."""
    want = torch.device(device).type
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    return [n for n, t in tensors if t.device.type != want]


def resolve_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Metric values as floats (callables are evaluated, as SAELens's trainer does when logging)."""
    out = {}
    for name, value in metrics.items():
        value = value() if callable(value) else value
        out[name] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return out


# --------------------------------------------------------------------------- training


@contextlib.contextmanager
def quiet_trainer_progress() -> Iterator[None]:
    """Silence SAETrainer's own progress bar (one per short fit) so this script's bar stays readable."""
    original = _sae_trainer_module.tqdm
    _sae_trainer_module.tqdm = functools.partial(original, disable=True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        _sae_trainer_module.tqdm = original  # type: ignore[attr-defined]


def make_trainer(
    sae: TrainingSAE[Any], batches: list[torch.Tensor], device: str, *, autocast: bool, steps: int
) -> SAETrainer[Any, Any]:
    """SAELens's trainer over ``batches`` (cycled), constant lr; dead windows of 2 steps so the
    AuxK and threshold-reset paths run within a short fit."""
    cfg = SAETrainerConfig(
        total_training_samples=steps * batches[0].shape[0],
        train_batch_size_samples=batches[0].shape[0],
        lr=1e-3,
        lr_end=1e-3,
        device=device,
        autocast=autocast,
        dead_feature_window=2,
        feature_sampling_window=max(2, steps),
        n_batches_for_norm_estimate=2,
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=itertools.cycle(batches))


def fit_recording(
    trainer: SAETrainer[Any, Any], after_first_step: Callable[[], None] | None = None
) -> tuple[list[float], TrainStepOutput]:
    """Run ``trainer.fit()``; return each step's loss and the last step's output."""
    losses: list[float] = []
    last: list[TrainStepOutput] = []
    step = trainer.step

    def recording_step(batch: torch.Tensor) -> TrainStepOutput:
        out = step(batch)
        losses.append(float(out.loss.detach()))
        last[:] = [out]
        if len(losses) == 1 and after_first_step is not None:
            after_first_step()
        return out

    trainer.step = recording_step  # type: ignore[method-assign]
    with quiet_trainer_progress():
        trainer.fit()
    return losses, last[0]


def step_input(sae: TrainingSAE[Any], x: torch.Tensor, *, logging: bool) -> TrainStepInput:
    coeffs = {
        k: v.value if isinstance(v, TrainCoefficientConfig) else float(v)
        for k, v in sae.get_coefficients().items()
    }
    return TrainStepInput(
        sae_in=x,
        coefficients=coeffs,
        dead_neuron_mask=torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device),
        n_training_steps=0,
        is_logging_step=logging,
    )


class Context:
    """State shared by the checks of one architecture (the trained SAE, its saved folder)."""

    def __init__(self, arch: str, role: str, args: argparse.Namespace, sizes: Sizes, tmp: Path):
        self.arch, self.role, self.args, self.sizes = arch, role, args, sizes
        self.device: str = args.device
        self.tmp = tmp / arch
        self.shape = (sizes.d_in, sizes.d_sae, sizes.k)
        self.trained: TrainingSAE[Any] | None = None
        self.fp32_first_loss: float | None = None
        x = sparse_activations(sizes.batch * 4, sizes.d_in, self.device)
        self.batches = list(x.split(sizes.batch))
        self.eval_x = sparse_activations(256, sizes.d_in, self.device, seed=1)

    def inference_dir(self) -> Path:
        """The fp32-trained SAE saved for inference (once)."""
        path = self.tmp / "inference"
        if not (path / "cfg.json").exists():
            self.trained_sae().save_inference_model(path)
        return path

    def trained_sae(self) -> TrainingSAE[Any]:
        if self.trained is None:
            raise CheckFailed("needs the SAE trained by train_fp32, which did not complete")
        return self.trained

    def load(self) -> SAE[Any]:
        return load_sae(self.inference_dir(), device=self.device)


def check_train(ctx: Context, *, autocast: bool) -> dict[str, Any]:
    sae = make_sae(ctx.arch, ctx.shape, ctx.device)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    trainer = make_trainer(sae, ctx.batches, ctx.device, autocast=autocast, steps=ctx.sizes.steps)
    losses, last = fit_recording(trainer)
    moved = [n for n in ("W_enc", "W_dec") if not torch.equal(before[n], getattr(sae, n).detach())]
    bad_params = [n for n, p in sae.named_parameters() if not torch.isfinite(p).all()]
    outputs_off = [
        n for n in ("loss", "sae_out", "feature_acts")
        if getattr(last, n).device.type != torch.device(ctx.device).type
    ]  # fmt: skip
    with torch.autocast(torch.device(ctx.device).type, torch.bfloat16, enabled=autocast):
        logged = sae.training_forward_pass(step_input(sae, ctx.batches[0], logging=True))
    metrics = resolve_metrics(logged.metrics)
    histograms = sorted(sae.log_histograms())
    thresholds = threshold_dtypes(sae)
    details = {
        "losses": [losses[0], losses[-1]],
        "metrics": metrics,
        "histograms": histograms,
        "threshold_dtypes": thresholds,
        "param_dtype": str(sae.W_dec.dtype),
    }
    require(all(map(_finite, losses)), "non-finite loss", **details, all_losses=losses)
    require(not bad_params, f"non-finite parameters {bad_params}", **details)
    require(moved == ["W_enc", "W_dec"], f"only {moved} of W_enc, W_dec changed", **details)
    require(
        not off_device(sae, ctx.device), f"off device: {off_device(sae, ctx.device)}", **details
    )
    require(not outputs_off, f"step outputs off device: {outputs_off}", **details)
    require(all(map(_finite, metrics.values())), "non-finite logging-step metric", **details)
    require(not narrow(thresholds), f"thresholds narrowed: {narrow(thresholds)}", **details)
    if autocast:
        ref = ctx.fp32_first_loss
        if ref is not None:
            details["first_loss_rel_diff_vs_fp32"] = abs(losses[0] - ref) / abs(ref)
            require(
                details["first_loss_rel_diff_vs_fp32"] < 0.05,
                "bf16-autocast first loss differs from float32 by >= 5 %",
                **details,
            )
    else:
        ctx.trained, ctx.fp32_first_loss = sae, losses[0]
    return details


def check_thresholds_bf16(ctx: Context) -> dict[str, Any]:
    sae = make_sae(ctx.arch, ctx.shape, ctx.device, dtype="bfloat16")
    trainer = make_trainer(
        sae, [b.bfloat16() for b in ctx.batches], ctx.device, autocast=False, steps=2
    )
    losses, _ = fit_recording(trainer)
    after_train = threshold_dtypes(sae)
    after_cast = threshold_dtypes(sae.to(torch.bfloat16))
    sae.save_inference_model(ctx.tmp / "bf16")
    loaded = load_sae(ctx.tmp / "bf16", device=ctx.device, dtype="bfloat16")
    in_loaded = threshold_dtypes(loaded)
    with torch.no_grad():
        out = loaded(ctx.eval_x.bfloat16())
    details = {
        "after_training": after_train,
        "after_to_bfloat16": after_cast,
        "loaded_bfloat16": in_loaded,
        "param_dtype": str(loaded.W_dec.dtype),
        "losses": losses,
    }
    if not (after_train or in_loaded):
        return {"skip": "no threshold tensors", **details}
    require(all(map(_finite, losses)), "non-finite bf16 loss", **details)
    for when, dtypes in (
        ("training", after_train),
        (".to(bfloat16)", after_cast),
        ("loading", in_loaded),
    ):
        require(
            not narrow(dtypes), f"thresholds narrowed after {when}: {narrow(dtypes)}", **details
        )
    require(bool(torch.isfinite(out).all()), "non-finite bf16 inference output", **details)
    return details


def check_save_load(ctx: Context) -> dict[str, Any]:
    first = ctx.load()
    require(
        not off_device(first, ctx.device), f"loaded off device: {off_device(first, ctx.device)}"
    )
    x = ctx.eval_x
    with torch.no_grad():
        y1, f1 = first(x), first.encode(x)
    first.save_model(ctx.tmp / "again")
    second = load_sae(ctx.tmp / "again", device=ctx.device)
    with torch.no_grad():
        y2, f2 = second(x), second.encode(x)
    details: dict[str, Any] = {"inference_class": type(first).__name__}
    require(bool(torch.isfinite(y1).all()), "non-finite output of the loaded SAE", **details)
    details["inference_max_abs_diff"] = float((y2 - y1).abs().max())
    require(
        torch.equal(y1, y2) and torch.equal(f1, f2),
        "inference save/load changed the outputs",
        **details,
    )

    trained = ctx.trained_sae()
    trained.save_model(ctx.tmp / "checkpoint")
    reloaded = TrainingSAE.load_from_disk(ctx.tmp / "checkpoint", device=ctx.device)
    require(
        not off_device(reloaded, ctx.device),
        f"checkpoint off device: {off_device(reloaded, ctx.device)}",
    )
    with torch.no_grad():
        t1, t2 = trained(x), reloaded(x)
    details["checkpoint_max_abs_diff"] = float((t2 - t1).abs().max())
    require(torch.equal(t1, t2), "training checkpoint save/load changed the outputs", **details)
    return details


def check_fold(ctx: Context) -> dict[str, Any]:
    sae = ctx.load()
    x = ctx.eval_x
    with torch.no_grad():
        scale = torch.linspace(
            0.5, 2.0, sae.cfg.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype
        )
        sae.W_dec.mul_(scale[:, None])  # decoder norms far from one: the fold has work to do
        before = sae(x)
        sae.fold_W_dec_norm()
        after = sae(x)
        norms = sae.W_dec.norm(dim=-1)
    details = {
        "max_abs_diff": float((after - before).abs().max()),
        "output_scale": float(before.abs().max()),
        "max_row_norm_error": float((norms - 1).abs().max()),
    }
    require(
        details["max_row_norm_error"] < 1e-5, "decoder rows not unit norm after the fold", **details
    )
    require(
        bool(torch.allclose(after, before, atol=1e-4, rtol=1e-4)),
        "fold_W_dec_norm changed the outputs",
        **details,
    )
    return details


@functools.lru_cache(maxsize=4)
def tiny_model(d_model: int, device: str) -> HookedSAETransformer:
    model = tiny_hooked_transformer(d_model=d_model, cls=HookedSAETransformer)
    return model.to(device, print_details=False)  # type: ignore[return-value]


def check_splice(ctx: Context) -> dict[str, Any]:
    model = tiny_model(ctx.sizes.d_in, ctx.device)
    sae = ctx.load()
    sae.cfg.metadata.hook_name = HOOK
    tokens = torch.randint(
        1, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    tokens = tokens.to(ctx.device)
    with torch.no_grad():
        clean = model(tokens)
        model.add_sae(sae, use_error_term=True)
        try:
            spliced, cache = model.run_with_cache(tokens)
        finally:
            model.reset_saes()
        model.add_sae(sae, use_error_term=False)
        try:
            plain = model(tokens)
        finally:
            model.reset_saes()
    details = {
        "max_abs_diff_with_error_term": float((spliced - clean).abs().max()),
        "max_abs_diff_without": float((plain - clean).abs().max()),
        "logits_device": str(spliced.device),
    }
    require(f"{HOOK}.hook_sae_error" in cache, "no hook_sae_error in the cache", **details)
    require(
        cache[f"{HOOK}.hook_sae_error"].device.type == torch.device(ctx.device).type,
        "error node off device",
    )
    require(
        bool(torch.allclose(spliced, clean, atol=1e-4, rtol=1e-4)),
        "splice with the error term does not reproduce the clean logits",
        **details,
    )
    require(
        not torch.allclose(plain, clean, atol=1e-4),
        "splice without the error term changed nothing",
        **details,
    )
    return details


def check_metrics(ctx: Context) -> dict[str, Any]:
    model = tiny_model(ctx.sizes.d_in, ctx.device)
    sae = ctx.load()
    sae.cfg.metadata.hook_name = HOOK
    rows = max(2, ctx.sizes.eval_tokens // 16)
    result = evaluate_sae(
        sae,
        model,
        random_token_dataset(n_rows=rows),
        n_tokens=ctx.sizes.eval_tokens,
        progress=False,
    )
    res = result.to_dict() if hasattr(result, "to_dict") else result  # the eval.json layout
    zero = res["error_node_ablation"]["zero"]
    details = {
        "run_evals": {
            k: res["run_evals"].get(k) for k in ("ce_loss_score", "explained_variance", "l0")
        },
        "dark_matter_fvu": res["dark_matter"].get("fvu"),
        "error_node_zero": zero,
        "scaffold": res.get("scaffold") is not None,
    }
    require(
        abs(zero["ce_spliced"] - zero["ce_clean"]) < 1e-4,
        "the error-node splice does not reproduce the clean CE",
        **details,
    )
    require(
        all(
            isinstance(res["run_evals"][k], float)
            for k in ("ce_loss_score", "explained_variance", "l0")
        ),
        "run_evals metrics missing",
        **details,
    )
    return details


# --------------------------------------------------------------------------- speed


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(trainer: SAETrainer[Any, Any], x: torch.Tensor, n: int, device: str) -> float:
    """Mean seconds per SAELens trainer step over ``n`` steps (device synchronised at both ends)."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        trainer.step(x)
        trainer.n_training_steps += 1
    _sync(device)
    return (time.perf_counter() - t) / n


def check_step_time(ctx: Context) -> dict[str, Any]:
    s, device = ctx.sizes, ctx.device
    sib = sibling_of(ctx.arch)
    x = torch.randn(s.speed_batch, s.speed_d_in, device=device)
    shape = (s.speed_d_in, s.speed_d_sae, s.speed_k)
    trainers = {}
    for name in (ctx.arch, sib):
        trainers[name] = make_trainer(
            make_sae(name, shape, device), [x], device, autocast=True, steps=10**6
        )
        trainers[name].sae.to(device)
        time_steps(trainers[name], x, s.warmup, device)
    times: dict[str, list[float]] = {ctx.arch: [], sib: [], "nan_check_on": []}
    block = max(1, s.reps // 4)
    for _ in range(4):  # interleaved blocks: drifts (clocks, other load) hit both arms alike
        for name, trainer in trainers.items():
            times[name].append(time_steps(trainer, x, block, device))
        with check_finite_training_inputs(True):
            times["nan_check_on"].append(time_steps(trainers[ctx.arch], x, block, device))
    with check_finite_training_inputs(False):
        nan_off = statistics.median(
            time_steps(trainers[ctx.arch], x, block, device) for _ in range(2)
        )
    med = {n: statistics.median(v) for n, v in times.items()}
    flops = (
        12 * s.speed_batch * s.speed_d_in * s.speed_d_sae
    )  # encoder + decoder matmuls, fwd + bwd
    row: dict[str, Any] = {
        "architecture": ctx.arch,
        "sibling": sib,
        "shape": {
            "d_in": s.speed_d_in,
            "d_sae": s.speed_d_sae,
            "batch": s.speed_batch,
            "k": s.speed_k,
        },
        "step_ms": med[ctx.arch] * 1e3,
        "sibling_step_ms": med[sib] * 1e3,
        "ratio": med[ctx.arch] / med[sib],
        "nan_check_on_step_ms": med["nan_check_on"] * 1e3,
        "nan_check_off_step_ms": nan_off * 1e3,
        "nan_check_overhead": med["nan_check_on"] / nan_off - 1,
    }
    if not ctx.args.quick:
        row["tflops"] = flops / med[ctx.arch] / 1e12
        row["sibling_tflops"] = flops / med[sib] / 1e12
        row["share_of_peak"] = flops / med[ctx.arch] / ctx.args.peak_flops
        row["sibling_share_of_peak"] = flops / med[sib] / ctx.args.peak_flops
    require(
        all(map(_finite, (row["step_ms"], row["sibling_step_ms"]))), "non-finite step time", **row
    )
    del trainers
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return row


def host_syncs(ctx: Context) -> dict[str, Any]:
    """Host synchronisations in two SAELens trainer steps (after one warm-up step), CUDA only."""
    sae = make_sae(ctx.arch, ctx.shape, ctx.device)
    trainer = make_trainer(sae, ctx.batches, ctx.device, autocast=True, steps=10**6)
    trainer.sae.to(ctx.device)
    for b in ctx.batches[:3]:  # past one-time work (scaffold PCA init) and into the AuxK window
        trainer.step(b)
        trainer.n_training_steps += 1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for b in ctx.batches[:2]:
                trainer.step(b)
                trainer.n_training_steps += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = [
        f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    ]
    return {"per_step": len(sites) / 2, "sites": sorted(set(sites))}


# --------------------------------------------------------------------------- compile


def check_compile(ctx: Context) -> dict[str, Any]:
    """Compile ``training_forward_pass`` inside SAELens's trainer; count the graphs and graph
    breaks of the first step (dynamo's ``ExplainWithBackend`` around the backend) after one-time
    initialisation (:func:`warmed_sae`); compare the losses with eager."""
    from torch._dynamo.backends.debugging import ExplainWithBackend

    steps = 1 if ctx.args.quick else 3  # one step on --quick: a single trace, no recompile
    eager = warmed_sae(ctx)
    eager_losses, _ = fit_recording(
        make_trainer(eager, ctx.batches, ctx.device, autocast=False, steps=steps)
    )

    torch._dynamo.reset()
    explain = ExplainWithBackend(ctx.args.compile_backend)
    compiled = warmed_sae(ctx)
    compiled.training_forward_pass = torch.compile(  # type: ignore[method-assign]
        compiled.training_forward_pass, backend=explain
    )
    first: dict[str, Any] = {}

    def after_first_step() -> None:
        first.update(
            graphs=len(explain.graphs),
            graph_breaks=len(explain.break_reasons),
            break_reasons=sorted({_reason(r) for r in explain.break_reasons})[:8],
        )

    t = time.perf_counter()
    compiled_losses, _ = fit_recording(
        make_trainer(compiled, ctx.batches, ctx.device, autocast=False, steps=steps),
        after_first_step,
    )
    details: dict[str, Any] = {
        "backend": ctx.args.compile_backend,
        **first,
        "graphs_all_steps": len(explain.graphs),
        "compiled_fit_seconds": time.perf_counter() - t,
        "eager_losses": eager_losses,
        "compiled_losses": compiled_losses,
    }
    if ctx.role == "plugin" and not ctx.args.quick:  # the cost of forcing the NaN/Inf check on
        torch._dynamo.reset()
        probe = warmed_sae(ctx)
        with check_finite_training_inputs(True):
            e = torch._dynamo.explain(probe.training_forward_pass)(
                step_input(probe, ctx.batches[0], logging=False)
            )
        details["graph_breaks_nan_check_on"] = e.graph_break_count
    torch._dynamo.reset()
    require(all(map(_finite, compiled_losses)), "non-finite compiled loss", **details)
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager_losses, compiled_losses))
    details["max_rel_loss_diff"] = rel
    require(rel < 2e-3, "compiled losses differ from eager by >= 0.2 %", **details)
    return details


def warmed_sae(ctx: Context) -> TrainingSAE[Any]:
    """A fresh SAE (seed 1) after one no-grad training forward pass, so that one-time work
    (scaffold PCA initialisation, data-dependent inits) is done and compile sees the steady state."""
    sae = make_sae(ctx.arch, ctx.shape, ctx.device, seed=1)
    with torch.no_grad():
        sae.training_forward_pass(step_input(sae, ctx.batches[-1], logging=False))
    return sae


def _reason(r: Any) -> str:
    """A graph-break reason's first line and the user code line it happened at."""
    frame = r.user_stack[-1] if getattr(r, "user_stack", None) else None
    where = f" @ {Path(frame.filename).name}:{frame.lineno}" if frame is not None else ""
    return f"{str(r.reason).splitlines()[0][:160]}{where}"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and v == v and abs(v) != float("inf")


# --------------------------------------------------------------------------- driver


class Recorder:
    """Collects records, keeps the time budget, rewrites the JSON and markdown after each check."""

    def __init__(self, args: argparse.Namespace, setup: dict[str, Any], n_checks: int) -> None:
        self.args, self.setup = args, setup
        self.records: list[dict[str, Any]] = []
        self.syncs: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=n_checks, desc="gpu_check", unit="check")

    def run(self, ctx: Context, check: str, fn: Callable[[], dict[str, Any]]) -> None:
        self.bar.set_postfix_str(f"{ctx.arch}: {check}")
        rec: dict[str, Any] = {"architecture": ctx.arch, "role": ctx.role, "check": check}
        if time.perf_counter() - self.t0 > self.args.budget_s:
            rec.update(
                status="skip", details={"skip": f"time budget of {self.args.budget_s:.0f} s spent"}
            )
        else:
            t = time.perf_counter()
            try:
                details = fn()
                skip = details.pop("skip", None) if isinstance(details, dict) else None
                rec.update(status="skip" if skip else "pass", details=details)
                if skip:
                    rec["details"]["skip"] = skip
            except CheckFailed as e:
                rec.update(status="fail", error=str(e), details=e.details)
            except Exception as e:  # a crash is a failed check, recorded with its traceback
                rec.update(
                    status="fail",
                    error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc()[-3000:],
                )
            rec["seconds"] = time.perf_counter() - t
        self.records.append(rec)
        if rec["status"] == "fail":
            tqdm.write(f"FAIL {ctx.arch} {check}: {rec.get('error')}")
        self.bar.update()
        self.write()

    def skip(self, ctx: Context, check: str, reason: str) -> None:
        self.records.append(
            {
                "architecture": ctx.arch,
                "role": ctx.role,
                "check": check,
                "status": "skip",
                "details": {"skip": reason},
                "seconds": 0.0,
            }
        )
        self.bar.update()

    def result(self) -> dict[str, Any]:
        counts = {s: sum(r["status"] == s for r in self.records) for s in ("pass", "fail", "skip")}
        return {
            "setup": self.setup,
            "summary": {
                **counts,
                "failed": [
                    f"{r['architecture']}/{r['check']}"
                    for r in self.records
                    if r["status"] == "fail"
                ],
                "seconds": time.perf_counter() - self.t0,
            },
            "checks": self.records,
            "step_time": [
                r["details"]
                for r in self.records
                if r["check"] == "step_time" and r["status"] == "pass"
            ],
            "host_syncs": self.syncs,
        }

    def write(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        res = self.result()
        (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(res))


def markdown(res: dict[str, Any]) -> str:
    s = res["setup"]
    mark = {"pass": "✓", "fail": "✗", "skip": "–"}
    archs = list(dict.fromkeys(r["architecture"] for r in res["checks"]))
    by = {(r["architecture"], r["check"]): r for r in res["checks"]}
    summary = res["summary"]
    lines = [
        "# CUDA readiness check (`benchmarks/gpu_check.py`)",
        "",
        f"Device {s['device_name']} (`{s['device']}`), torch {s['torch']}, SAELens {s['sae_lens']}, "
        f"sae_ext {s['sae_ext']}; {'--quick (tiny shapes)' if s['quick'] else 'full run'}; compile backend "
        f"`{s['compile_backend']}`. {summary['pass']} passed, {summary['fail']} failed, {summary['skip']} "
        f"skipped in {summary['seconds']:.0f} s.",
        "",
        f"Checks at d_in {s['sizes']['d_in']}, d_sae {s['sizes']['d_sae']}, batch {s['sizes']['batch']}, "
        f"{s['sizes']['steps']} SAELens trainer steps. ✓ pass, ✗ fail, – skipped (not applicable).",
        "",
        "| architecture | role | " + " | ".join(CHECK_ORDER) + " |",
        "|---|---|" + "---|" * len(CHECK_ORDER),
    ]
    for a in archs:
        role = next(r["role"] for r in res["checks"] if r["architecture"] == a)
        cells = [mark[by[(a, c)]["status"]] if (a, c) in by else " " for c in CHECK_ORDER]
        lines.append(f"| {a} | {role} | " + " | ".join(cells) + " |")
    failed = [r for r in res["checks"] if r["status"] == "fail"]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {r['architecture']} / {r['check']}: {r.get('error')}" for r in failed]
    rows = res["step_time"]
    if rows:
        shp = rows[0]["shape"]
        lines += [
            "",
            f"## Step time vs the SAELens sibling (bf16 autocast, d_in {shp['d_in']}, d_sae {shp['d_sae']}, "
            f"batch {shp['batch']}, k {shp['k']})",
            "",
            "One SAELens `SAETrainer.step` (forward, backward, grad clipping, Adam), median of 4 interleaved "
            "blocks. FLOP/s count the nominal encoder + decoder matmuls (12·batch·d_in·d_sae per step); "
            f"share of the bf16 peak {s['peak_flops']:.3g} FLOP/s. NaN check: the step with the training "
            "NaN/Inf check forced on, against forced off.",
            "",
            "| architecture | ms/step | sibling | sibling ms/step | ratio | TFLOP/s (share of peak) "
            "| sibling TFLOP/s (share) | NaN check on / off ms | overhead |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            tf = f"{r['tflops']:.0f} ({r['share_of_peak']:.0%})" if "tflops" in r else "– (--quick)"
            stf = (
                f"{r['sibling_tflops']:.0f} ({r['sibling_share_of_peak']:.0%})"
                if "tflops" in r
                else "–"
            )
            lines.append(
                f"| {r['architecture']} | {r['step_ms']:.2f} | {r['sibling']} | {r['sibling_step_ms']:.2f} "
                f"| {r['ratio']:.2f} | {tf} | {stf} | {r['nan_check_on_step_ms']:.2f} / "
                f"{r['nan_check_off_step_ms']:.2f} | {r['nan_check_overhead']:+.1%} |"
            )
    comp = [
        r
        for r in res["checks"]
        if r["check"] == "compile"
        and r["status"] != "skip"
        and "graph_breaks" in r.get("details", {})
    ]
    if comp:
        lines += [
            "",
            "## torch.compile of `training_forward_pass`",
            "",
            "Counted in the first training step (dynamo's `ExplainWithBackend` around "
            f"`{s['compile_backend']}`); NaN check forced on: "
            "`torch._dynamo.explain` with `check_finite_training_inputs(True)` (full runs only).",
            "",
            "| architecture | graphs | graph breaks | with NaN check forced on | compiled fit s | break reasons |",
            "|---|---|---|---|---|---|",
        ]
        for r in comp:
            d = r["details"]
            reasons = "; ".join(d["break_reasons"]).replace("|", "\\|") or "–"
            lines.append(
                f"| {r['architecture']} | {d['graphs']} | {d['graph_breaks']} "
                f"| {d.get('graph_breaks_nan_check_on', '–')} | {d['compiled_fit_seconds']:.1f} | {reasons} |"
            )
    if res["host_syncs"]:
        lines += [
            "",
            "## Host synchronisations per training step (CUDA sync debug mode)",
            "",
            "| architecture | per step | sites |",
            "|---|---|---|",
        ]
        for a, v in res["host_syncs"].items():
            sites = ", ".join(v.get("sites", [])) or v.get("error", "–")
            lines.append(f"| {a} | {v.get('per_step', '–')} | {sites} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (default cuda)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes (a CPU dry run); step times as ratios only",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for gpu_check.json and gpu_check.md"
    )
    p.add_argument(
        "--peak-flops",
        type=float,
        default=DEFAULT_PEAK_FLOPS,
        help="dense bf16 matmul peak of the device in FLOP/s (default: H100/H200-class, 790e12)",
    )
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on CUDA, eager on CPU)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="checks not started within this many seconds are recorded as skipped",
    )
    p.add_argument(
        "--only", nargs="*", help="plugin architectures to check (default: every registered one)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 avoids thread contention on a busy CPU)",
    )
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads!r}")
    device = torch.device(args.device)  # raises on a malformed name
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N; got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {args.device!r} but torch.cuda.is_available() is False; use --device cpu"
        )
    for name in ("peak_flops", "budget_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0; got {getattr(args, name)!r}")
    plugins = plugin_training_architectures()
    unknown = sorted(set(args.only or ()) - set(plugins))
    if unknown:
        raise ValueError(f"--only: unknown plugin architectures {unknown}; registered: {plugins}")
    if args.compile_backend is None:
        args.compile_backend = "inductor" if device.type == "cuda" else "eager"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every check; return the exit status (1 if any check failed)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    plugins = args.only or plugin_training_architectures()
    pairs = [(a, sibling_of(a)) for a in plugins]
    archs: list[tuple[str, str]] = []  # (architecture, role), plugin then its sibling, each once
    for a, sib in pairs:
        archs += [(a, "plugin")] + (
            [(sib, f"sibling of {a}")] if all(sib != x for x, _ in archs) else []
        )
    device = torch.device(args.device)
    import sae_lens

    setup = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sae_lens": sae_lens.__version__,
        "sae_ext": sae_ext.__version__,
        "python": sys.version.split()[0],
        "quick": args.quick,
        "sizes": dataclasses.asdict(sizes),
        "peak_flops": args.peak_flops,
        "compile_backend": args.compile_backend,
        "cpu_threads": torch.get_num_threads(),
        "pairs": dict(pairs),
        "argv": sys.argv if argv is None else argv,
    }
    rec = Recorder(args, setup, n_checks=len(archs) * len(CHECK_ORDER))
    with tempfile.TemporaryDirectory(prefix="sae_ext_gpu_check_") as tmp_dir:
        contexts = [Context(a, role, args, sizes, Path(tmp_dir)) for a, role in archs]
        for ctx in contexts:
            plugin = ctx.role == "plugin"
            rec.run(ctx, "train_fp32", lambda ctx=ctx: check_train(ctx, autocast=False))
            rec.run(ctx, "train_bf16_autocast", lambda ctx=ctx: check_train(ctx, autocast=True))
            if plugin:
                rec.run(ctx, "thresholds_bf16_sae", lambda ctx=ctx: check_thresholds_bf16(ctx))
            else:
                rec.skip(
                    ctx,
                    "thresholds_bf16_sae",
                    "SAELens's own class (threshold dtypes in train_* details)",
                )
            rec.run(ctx, "save_load", lambda ctx=ctx: check_save_load(ctx))
            rec.run(ctx, "fold_W_dec_norm", lambda ctx=ctx: check_fold(ctx))
            rec.run(ctx, "splice_error_term", lambda ctx=ctx: check_splice(ctx))
            if plugin:
                rec.run(ctx, "metrics", lambda ctx=ctx: check_metrics(ctx))
            else:
                rec.skip(
                    ctx, "metrics", "SAELens's own class (the metrics are run on each plugin SAE)"
                )
            if device.type == "cuda":
                try:
                    rec.syncs[ctx.arch] = host_syncs(ctx)
                except Exception as e:  # a measurement, not a check: record why it is missing
                    rec.syncs[ctx.arch] = {"error": f"{type(e).__name__}: {e}"}
        for ctx in contexts:
            if ctx.role == "plugin":
                rec.run(ctx, "step_time", lambda ctx=ctx: check_step_time(ctx))
            else:
                rec.skip(ctx, "step_time", f"timed as the sibling ({ctx.role})")
        for ctx in contexts:
            rec.run(ctx, "compile", lambda ctx=ctx: check_compile(ctx))
    rec.bar.close()
    rec.write()
    res = rec.result()
    print(markdown(res))
    print(f"wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.md")
    return 1 if res["summary"]["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
