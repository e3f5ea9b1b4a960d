"""bf16 stability (issue 10): 200 training steps of every plugin architecture in bfloat16 on
real activations of the embedded model, checked for NaN/Inf on every step.

Activations: ``blocks.15.hook_mlp_out`` of the embedded SmolLM2-135M
(``sae_ext.models.load_default_model``) over ~16k tokens of the embedded corpus
(``sae_ext.data.default_token_dataset``), captured with ``sae_ext.capture.capture_activations``
into a temporary directory; the last 10 % of tokens are held out. Each SAE has
``dtype="bfloat16"`` (parameters, optimizer state and activations in bf16; SA-GSAE thresholds
stay float32 and BatchTopK's running threshold float64 by design) and is trained with
SAELens's ``SAETrainer`` on shuffled batches of the captured activations, inputs normalised
to E‖x‖² = d_in (``expected_average_only_in``, folded back into the weights at the end), as
the demo does. Widths follow the demo: SA-GSAE at H, the others at 2H.

Reported per architecture: final loss and MSE (mean of the last 10 steps, normalised units),
steps with any non-finite loss / output / latent, non-finite parameters, training L0 (last
step), and, for the saved inference SAE reloaded with ``sae_ext.load_sae`` in bf16, held-out
L0, FVU and NaN count; the dtype of the thresholds in training and in the saved SAE. Each
architecture is also trained in float32 from the same initialisation on the same batches, as
a reference for what bf16 should reach (``--no-float32-reference`` skips it).

    python benchmarks/bf16_200_steps.py                    # ~16k tokens, 200 steps
    python benchmarks/bf16_200_steps.py --steps 20 --tokens 4096 --out /tmp/quick
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

import sae_ext
from sae_ext.capture import capture_activations, check_hook_name
from sae_ext.data import default_token_dataset
from sae_ext.loading import load_sae
from sae_ext.models import DEFAULT_MODEL_NAME, load_default_model
from sae_ext.registry import plugin_training_architectures

RESULTS = Path(__file__).resolve().parent / "results"
HOOK = "blocks.15.hook_mlp_out"
#: training tensors that hold thresholds, per architecture (``None``: the architecture has none)
THRESHOLD_TENSORS = {
    "sign_aware_gated": ("threshold_pos", "threshold_pos"),
    "scaffold_batchtopk": ("topk_threshold", "threshold"),
    "scaffold_matryoshka_batchtopk": ("topk_threshold", "threshold"),
    "sasa": None,
}


def sae_kwargs(arch: str, d_in: int, width: int, k: int, dtype: str) -> dict[str, Any]:
    """The demo's settings (``sae_ext.demo.demo_entries``) for ``arch``."""
    norm = {"normalize_activations": "expected_average_only_in", "dtype": dtype}
    if arch == "sign_aware_gated":
        return {"d_in": d_in, "d_sae": width, "l0_coefficient": 1.0, **norm}
    if arch.startswith("scaffold"):
        return {"d_in": d_in, "d_sae": 2 * width, "k": k, **norm}
    if arch == "sasa":
        group_rank = 4
        return {
            "d_in": d_in, "d_sae": 2 * width, "group_rank": group_rank,
            "n_active_groups": k // group_rank, "nuclear_coefficient": 3.0, **norm,
        }  # fmt: skip
    raise ValueError(f"no benchmark settings for {arch!r}")


def batches(
    acts: torch.Tensor, batch: int, seed: int, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """Shuffled batches of ``acts`` in ``dtype``, epoch after epoch (same order for every SAE)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=g)
        for i in range(0, acts.shape[0] - batch + 1, batch):
            yield acts[perm[i : i + batch]].to(dtype)


def non_finite(out: TrainStepOutput) -> list[str]:
    """Names of the step outputs holding NaN/Inf."""
    bad = [
        name
        for name, t in (
            ("loss", out.loss),
            ("sae_out", out.sae_out),
            ("feature_acts", out.feature_acts),
        )
        if not torch.isfinite(t.detach()).all()
    ]
    bad += [
        f"losses/{k}" for k, v in out.losses.items() if not torch.isfinite(torch.as_tensor(v)).all()
    ]
    return bad


def train_one(
    arch: str,
    train: torch.Tensor,
    held_out: torch.Tensor,
    args: argparse.Namespace,
    tmp: Path,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """Train ``arch`` for ``args.steps`` steps in ``dtype``; the row of the results table."""
    torch.manual_seed(args.seed)
    cfg_cls = get_sae_training_class(arch)[1]
    sae: TrainingSAE = get_sae_training_class(arch)[0](
        cfg_cls(**sae_kwargs(arch, train.shape[1], args.width, args.k, dtype))
    )
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=args.steps * args.batch,
            train_batch_size_samples=args.batch,
            lr=args.lr,
            lr_end=args.lr,
            dead_feature_window=50,  # dead latents (AuxK, threshold resets) within 200 steps
            feature_sampling_window=1000,
            n_batches_for_norm_estimate=10,
        ),
        sae=sae,
        data_provider=batches(train, args.batch, args.seed, getattr(torch, dtype)),
    )
    history: list[dict[str, Any]] = []
    step = trainer.step

    def recording_step(batch: torch.Tensor) -> TrainStepOutput:
        out = step(batch)
        with torch.no_grad():
            history.append({
                "loss": out.loss.item(),
                "mse": out.losses["mse_loss"].item(),
                "l0": (out.feature_acts != 0).sum(-1).double().mean().item(),
                "non_finite": non_finite(out),
            })  # fmt: skip
        return out

    trainer.step = recording_step  # type: ignore[method-assign]
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0

    names = THRESHOLD_TENSORS[arch]
    train_threshold_dtype = str(sae.state_dict()[names[0]].dtype) if names else None
    bad_params = [n for n, p in sae.named_parameters() if not torch.isfinite(p).all()]
    sae.save_inference_model(tmp / f"{arch}_{dtype}")
    loaded = load_sae(tmp / f"{arch}_{dtype}")  # in the SAE's dtype, as saved
    saved_threshold_dtype = str(loaded.state_dict()[names[1]].dtype) if names else None
    with torch.no_grad():
        f = torch.cat([loaded.encode(x) for x in held_out.split(1024)])
        y = torch.cat([loaded(x) for x in held_out.split(1024)]).float()
    fvu = ((y - held_out).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum()).item()
    last = history[-10:]
    return {
        "architecture": arch,
        "dtype": dtype,
        "d_sae": sae.cfg.d_sae,
        "steps": len(history),
        "first_loss": history[0]["loss"],
        "final_loss": sum(h["loss"] for h in last) / len(last),
        "final_mse": sum(h["mse"] for h in last) / len(last),
        "non_finite_steps": [i for i, h in enumerate(history) if h["non_finite"]],
        "non_finite_what": sorted({w for h in history for w in h["non_finite"]}),
        "non_finite_params": bad_params,
        "train_l0_last_step": history[-1]["l0"],
        "held_out_l0": (f != 0).sum(-1).double().mean().item(),
        "held_out_fvu": fvu,
        "held_out_nan_outputs": int((~torch.isfinite(y)).sum()),
        "param_dtype": str(sae.W_dec.dtype),
        "train_threshold_dtype": train_threshold_dtype,
        "saved_threshold_dtype": saved_threshold_dtype,
        "seconds": seconds,
        "loss_curve": [h["loss"] for h in history],
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"# bf16 training stability: {s['steps']} steps per plugin architecture",
        "",
        f"{s['model']} `{s['hook']}` activations (d_in = {s['d_in']}), {s['train_tokens']} training "
        f"and {s['held_out_tokens']} held-out tokens; SAE dtype bfloat16, SAELens `SAETrainer`, "
        f"{s['steps']} steps of {s['batch']} tokens, lr {s['lr']}, inputs normalised to "
        f"E‖x‖² = d_in; k = {s['k']}, H = {s['width']}. {s['platform']}, torch {s['torch']}.",
        "",
        "Loss and MSE: mean of the last 10 steps, in normalised units. Held-out: the saved "
        "inference SAE reloaded with `sae_ext.load_sae` (bf16).",
        "",
        "| architecture | d_sae | first → final loss | final MSE | non-finite steps | non-finite params "
        "| train L0 | held-out L0 | held-out FVU | held-out NaN | thresholds (train → saved) | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {r["architecture"]: r for r in result.get("float32_reference", [])}
    for r in result["rows"]:
        thr = (
            f"{r['train_threshold_dtype']} → {r['saved_threshold_dtype']}"
            if r["train_threshold_dtype"]
            else "— (none)"
        )
        lines.append(
            f"| {r['architecture']} | {r['d_sae']} | {r['first_loss']:.1f} → {r['final_loss']:.2f} "
            f"| {r['final_mse']:.2f} | {len(r['non_finite_steps'])} | {len(r['non_finite_params'])} "
            f"| {r['train_l0_last_step']:.1f} | {r['held_out_l0']:.1f} | {r['held_out_fvu']:.3f} "
            f"| {r['held_out_nan_outputs']} | {thr} | {r['seconds']:.0f} |"
        )
    if ref:
        lines += [
            "",
            "The same runs in float32 (same initialisation and batch order), for reference:",
            "",
            "| architecture | final MSE bf16 / fp32 | train L0 bf16 / fp32 | held-out FVU bf16 / fp32 "
            "| held-out L0 bf16 / fp32 |",
            "|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            f = ref.get(r["architecture"])
            if f is None:
                continue
            lines.append(
                f"| {r['architecture']} | {r['final_mse']:.2f} / {f['final_mse']:.2f} "
                f"| {r['train_l0_last_step']:.1f} / {f['train_l0_last_step']:.1f} "
                f"| {r['held_out_fvu']:.3f} / {f['held_out_fvu']:.3f} "
                f"| {r['held_out_l0']:.1f} / {f['held_out_l0']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tokens", type=int, default=16384, help="tokens to capture (10 %% held out)")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=512, help="training batch in tokens")
    p.add_argument("--width", type=int, default=576, help="H: SA-GSAE's width; the others get 2H")
    p.add_argument(
        "--k", type=int, default=32, help="active latents per token (TopK family, SASA s·r)"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="architectures to run (default: every plugin one)")
    p.add_argument(
        "--no-float32-reference",
        action="store_true",
        help="skip the float32 runs of the same setup (reported beside the bf16 ones)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where bf16_200_steps.{json,md} go")
    args = p.parse_args()
    archs = args.only or plugin_training_architectures()
    unknown = sorted(set(archs) - set(THRESHOLD_TENSORS))
    if unknown:
        raise ValueError(
            f"unknown architectures {unknown}; choose from {sorted(THRESHOLD_TENSORS)}"
        )

    model = load_default_model()
    check_hook_name(model, HOOK)
    ds = default_token_dataset(
        model.tokenizer, args.context_size, n_tokens=args.tokens, split="train"
    )
    rows, reference = [], []
    with tempfile.TemporaryDirectory(prefix="sae_ext_bf16_") as tmp_dir:
        tmp = Path(tmp_dir)
        t0 = time.perf_counter()
        cache = capture_activations(
            model, ds, HOOK, tmp / "activations", n_tokens=len(ds) * args.context_size,
            model_name=DEFAULT_MODEL_NAME,
        )  # fmt: skip
        capture_s = time.perf_counter() - t0
        acts = cache.activations().float()
        n_held = max(args.batch, acts.shape[0] // 10)
        train, held_out = acts[:-n_held], acts[-n_held:]
        print(f"captured {acts.shape[0]} tokens x {acts.shape[1]} in {capture_s:.0f} s", flush=True)
        for arch in archs:
            for dtype in ("bfloat16",) if args.no_float32_reference else ("bfloat16", "float32"):
                row = train_one(arch, train, held_out, args, tmp, dtype)
                print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}), flush=True)
                (rows if dtype == "bfloat16" else reference).append(row)
    result = {
        "setup": {
            "model": DEFAULT_MODEL_NAME, "hook": HOOK, "d_in": int(acts.shape[1]),
            "train_tokens": int(train.shape[0]), "held_out_tokens": int(held_out.shape[0]),
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "k": args.k,
            "width": args.width, "seed": args.seed, "capture_seconds": capture_s,
            "platform": platform.platform(), "torch": torch.__version__,
            "sae_ext": sae_ext.__version__,
        },
        "rows": rows,
        "float32_reference": reference,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16_200_steps.json").write_text(json.dumps(result, indent=1))
    (args.out / "bf16_200_steps.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
