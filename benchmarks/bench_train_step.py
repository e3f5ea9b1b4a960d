"""Training-step speed of each sae_ext architecture against its SAELens sibling (issue 9).

For each pair, at d_in 576, d_sae 4608, batch 4096 tokens, float32 on this machine's CPU:
median wall time of one SAELens training step (``training_forward_pass`` + backward + Adam),
the ratio to the sibling (measured in the same process, interleaved), achieved GFLOP/s
against the measured sgemm rate of the same matmul shape (the floor), and peak RSS (each
architecture in its own subprocess). Also: bf16 autocast and ``torch.compile`` loss curves
against float32 eager, activation-capture tokens/s against the bare model forward, and the
demo's phase wall times (from a demo ``report.json`` if given). The step table is measured
twice: with glibc's default allocator, then with :func:`sae_ext.perf.retain_freed_memory`
(what ``sae-ext`` commands run with), each time for both arms in the same process.

    python benchmarks/bench_train_step.py                 # full table (~10 min on 2 cores)
    python benchmarks/bench_train_step.py --quick         # small shapes, a minute
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainCoefficientConfig, TrainingSAE, TrainStepInput

from sae_ext.perf import retain_freed_memory

RESULTS = Path(__file__).parent / "results"


def pairs(d_sae: int, k: int) -> list[tuple[str, dict[str, Any], str, dict[str, Any]]]:
    """(plugin arch, its kwargs, sibling arch, sibling kwargs) at the same width and sparsity."""
    return [
        ("sign_aware_gated", {}, "gated", {}),
        ("scaffold_batchtopk", {"k": k}, "batchtopk", {"k": k}),
        ("sasa", {"group_rank": 4, "n_active_groups": k // 4}, "topk", {"k": k}),
    ]


def make_sae(arch: str, d_in: int, d_sae: int, kwargs: dict[str, Any]) -> TrainingSAE:
    sae_cls, cfg_cls = get_sae_training_class(arch)
    return sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, **kwargs))


def step_input(sae: TrainingSAE, x: torch.Tensor, step: int) -> TrainStepInput:
    coeffs = {
        k: v.value if isinstance(v, TrainCoefficientConfig) else float(v)
        for k, v in sae.get_coefficients().items()
    }
    return TrainStepInput(
        sae_in=x, coefficients=coeffs, dead_neuron_mask=torch.zeros(sae.cfg.d_sae, dtype=torch.bool),
        n_training_steps=step, is_logging_step=False,
    )


class Stepper:
    """One SAE with its Adam optimiser; ``step`` runs a SAELens training step."""

    def __init__(self, sae: TrainingSAE, compile_: bool = False, autocast: bool = False):
        self.sae, self.autocast, self.n = sae, autocast, 0
        self.opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        self.fwd = torch.compile(sae.training_forward_pass) if compile_ else sae.training_forward_pass

    def step(self, x: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.fwd(step_input(self.sae, x, self.n))
        out.loss.backward()
        self.opt.step()
        self.n += 1
        return float(out.loss)


def sgemm_gflops(b: int, d_in: int, d_sae: int, reps: int = 5) -> float:
    a, w = torch.randn(b, d_in), torch.randn(d_in, d_sae)
    a @ w
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ w
        times.append(time.perf_counter() - t)
    return 2 * b * d_in * d_sae / statistics.median(times) / 1e9


def time_pairs(d_in: int, d_sae: int, batch: int, k: int, reps: int, only: list[str] | None = None) -> list[dict[str, Any]]:
    x = torch.randn(batch, d_in)
    floor = sgemm_gflops(batch, d_in, d_sae)
    flops = 12 * batch * d_in * d_sae  # enc + dec matmuls, forward and backward
    rows = []
    for arch, kw, sib, skw in pairs(d_sae, k):
        if only and arch not in only:
            continue
        steppers = {arch: Stepper(make_sae(arch, d_in, d_sae, kw)), sib: Stepper(make_sae(sib, d_in, d_sae, skw))}
        times: dict[str, list[float]] = {arch: [], sib: []}
        for s in steppers.values():  # warm-up
            s.step(x)
        for _ in range(reps):
            for name, s in steppers.items():
                t = time.perf_counter()
                s.step(x)
                times[name].append(time.perf_counter() - t)
        med = {n: statistics.median(v) for n, v in times.items()}
        rows.append({
            "architecture": arch, "sibling": sib, "step_ms": med[arch] * 1e3, "sibling_step_ms": med[sib] * 1e3,
            "ratio": med[arch] / med[sib], "gflops": flops / med[arch] / 1e9,
            "sibling_gflops": flops / med[sib] / 1e9, "sgemm_floor_gflops": floor,
            "fraction_of_floor": flops / med[arch] / 1e9 / floor,
        })
        print(f"{arch:>20} {med[arch]*1e3:8.1f} ms  vs {sib:>10} {med[sib]*1e3:8.1f} ms  ratio {med[arch]/med[sib]:.2f}")
    return rows


def peak_rss_mb(arch: str, kwargs: dict[str, Any], d_in: int, d_sae: int, batch: int) -> float:
    """Peak resident memory of a fresh process running 3 training steps of ``arch``."""
    cmd = [sys.executable, __file__, "--rss-of", arch, "--rss-kwargs", json.dumps(kwargs),
           "--rss-shape", f"{d_in},{d_sae},{batch}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def loss_curves(d_in: int, d_sae: int, batch: int, k: int, steps: int) -> list[dict[str, Any]]:
    """Loss after ``steps`` steps: float32 eager vs bf16 autocast vs torch.compile, same seed."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, d_in, generator=g) for _ in range(steps)]
    rows = []
    for arch, kw, sib, skw in pairs(d_sae, k):
        for name, kwargs in ((arch, kw), (sib, skw)):
            curves = {}
            for mode in ("fp32", "bf16_autocast", "compile"):
                torch.manual_seed(0)
                s = Stepper(make_sae(name, d_in, d_sae, kwargs), compile_=mode == "compile", autocast=mode == "bf16_autocast")
                curves[mode] = [s.step(x) for x in data]
            finite = all(torch.isfinite(torch.tensor(c)).all() for c in curves.values())
            rel = {m: abs(curves[m][-1] - curves["fp32"][-1]) / abs(curves["fp32"][-1]) for m in curves if m != "fp32"}
            rows.append({"architecture": name, "finite": bool(finite), "final_loss": {m: c[-1] for m, c in curves.items()},
                         "rel_diff_final_loss": rel})
            print(f"{name:>20} finite={finite} final loss fp32 {curves['fp32'][-1]:.4f} "
                  + " ".join(f"{m} Δ{v:.2%}" for m, v in rel.items()))
    return rows


def capture_speed(n_tokens: int) -> dict[str, float]:
    """Activation capture tokens/s (SAELens's cache runner) vs the bare forward to the hook layer."""
    import tempfile

    from sae_ext.capture import capture_activations
    from sae_ext.data import default_token_dataset
    from sae_ext.models import load_default_model

    model = load_default_model()
    ds = default_token_dataset(model.tokenizer, 128, n_tokens=n_tokens)
    hook = "blocks.15.hook_mlp_out"
    toks = torch.tensor(ds["input_ids"])
    with torch.no_grad():
        model.run_with_cache(toks[:8], names_filter=[hook], stop_at_layer=16)
        t = time.perf_counter()
        for i in range(0, len(toks), 8):
            model.run_with_cache(toks[i:i + 8], names_filter=[hook], stop_at_layer=16)
        bare = len(toks) * 128 / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        capture_activations(model, ds, hook, Path(d) / "c", n_tokens=len(toks) * 128)
        cap = len(toks) * 128 / (time.perf_counter() - t)
    print(f"capture {cap:.0f} tok/s vs bare forward {bare:.0f} tok/s ({cap / bare:.2f}×)")
    return {"capture_tok_s": cap, "bare_forward_tok_s": bare, "ratio": cap / bare}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and few reps")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--capture-tokens", type=int, default=8192)
    p.add_argument("--demo-report", type=Path, help="a demo report.json to take phase times from")
    p.add_argument("--skip-capture", action="store_true")
    p.add_argument("--only", nargs="*", help="time only these plugin architectures (with their siblings)")
    p.add_argument("--steps-only", action="store_true",
                   help="only the step-time tables (no peak RSS, precision or capture); writes train_step_steps.json")
    p.add_argument("--rss-of", help=argparse.SUPPRESS)
    p.add_argument("--rss-kwargs", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--rss-shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_of:  # child process of peak_rss_mb
        d_in, d_sae, batch = map(int, args.rss_shape.split(","))
        s = Stepper(make_sae(args.rss_of, d_in, d_sae, json.loads(args.rss_kwargs)))
        x = torch.randn(batch, d_in)
        for _ in range(3):
            s.step(x)
        # VmHWM (peak RSS of this exec'd image); ru_maxrss would include the forking parent's peak
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        print(int(hwm.split()[1]))
        return
    d_in, d_sae, batch, k = (576, 4608, 4096, 64) if not args.quick else (64, 512, 512, 16)
    reps = args.reps if not args.quick else 3
    res: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "shape": {"d_in": d_in, "d_sae": d_sae, "batch": batch, "k": k},
    }
    res["steps"] = time_pairs(d_in, d_sae, batch, k, reps, args.only)
    if retain_freed_memory():  # the allocator `sae-ext` runs with (sae_ext.perf); both arms alike
        print("with glibc keeping freed memory (sae_ext.perf.retain_freed_memory):")
        res["steps_retain_freed_memory"] = time_pairs(d_in, d_sae, batch, k, reps, args.only)
    if args.steps_only:
        RESULTS.mkdir(exist_ok=True)
        name = "train_step_steps" + ("_" + "_".join(args.only) if args.only else "")
        (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2))
        print(f"wrote {RESULTS / (name + '.json')}")
        return
    res["peak_rss_mb"] = {}
    for arch, kw, sib, skw in pairs(d_sae, k):
        res["peak_rss_mb"][arch] = peak_rss_mb(arch, kw, d_in, d_sae, batch)
        res["peak_rss_mb"][sib] = peak_rss_mb(sib, skw, d_in, d_sae, batch)
    res["precision"] = loss_curves(d_in, min(d_sae, 2048), min(batch, 1024), k, steps=20 if not args.quick else 5)
    if not args.skip_capture and not args.quick:
        res["capture"] = capture_speed(args.capture_tokens)
    if args.demo_report:
        res["demo_phase_seconds"] = json.loads(args.demo_report.read_text())["phase_seconds"]
    RESULTS.mkdir(exist_ok=True)
    name = "train_step_quick" if args.quick else "train_step"
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {RESULTS / (name + '.json')}; max RSS this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
