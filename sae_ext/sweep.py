"""`sae-ext sweep`: sparsity sweeps of several architectures on one capture, and their L0 curves.

A grid names one hook and, per architecture, its width, its sparsity knob (a field of its training
config: ``k``, ``l1_coefficient``, ``l0_coefficient``, ``target_l0``, ``n_active_groups`` …) and the
knob's values; every (architecture, value, seed) is trained with :func:`sae_ext.capture.train_on_cache`
under SPEC §8 on one capture of the hook, evaluated on held-out tokens
(:func:`sae_ext.evaluate.evaluate_sae`: L0, R², CE and KL loss recovered via ``run_evals``, dead,
dense, bipolar and group statistics) and checked for convergence (R² at half budget). One JSON
record per run, a markdown table, R²-vs-L0 and CE-vs-L0 plots (log L0, one line per architecture,
Pareto frontier marked) and matched-L0 gaps (each pair of curves interpolated in log L0 over the
overlap of their L0 ranges, converged runs only) are written. Finished runs with identical
arguments are reused, so a grid can span sessions.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_ext.metrics.curves import matched_gap, pareto_front
from sae_ext.protocol import LR_DECAY_FRACTION, LR_WARM_UP_FRACTION

#: The record fields plotted against L0.
CURVE_METRICS = {"r2": "explained variance R²", "ce_loss_recovered": "CE loss recovered"}


@dataclass(frozen=True)
class ArchSweep:
    """One architecture's line: its width, its sparsity knob and the knob's values."""

    architecture: str
    d_sae: int
    knob: str
    values: tuple[float | int, ...]
    config: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None  # None: the grid's seeds
    label: str | None = None  # the line's name (default: the architecture)

    @property
    def name(self) -> str:
        return self.label or self.architecture


@dataclass(frozen=True)
class SweepGrid:
    """A whole sweep: one hook, the architectures' lines, the protocol's budget."""

    name: str
    hook: str
    archs: tuple[ArchSweep, ...]
    seeds: tuple[int, ...] = (0,)
    tokens: int = 3_000_000
    batch_size: int = 1024
    lr: float = 1e-3
    context_size: int = 128
    capture_tokens: int | None = None  # None: the whole train split
    eval_tokens: int = 8192

    def runs(self) -> list[tuple[ArchSweep, float | int, int]]:
        """Every (line, knob value, seed) of the grid, in order."""
        return [(a, v, s) for a in self.archs for v in a.values for s in (a.seeds or self.seeds)]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def validate_grid(grid: SweepGrid, d_in: int | None = None) -> SweepGrid:
    """Raise one clear ``ValueError`` for anything wrong with ``grid``, before any work.

    Each run's training config is built once; ``d_in`` is the hook's width when known (else each
    line's ``d_sae`` stands in for it).
    """
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_ext.registry import plugin_training_architectures

    if not grid.name or "/" in grid.name:
        raise ValueError(f"the grid's name must be a plain file name, got {grid.name!r}")
    if not grid.archs or not grid.runs():
        raise ValueError("the grid is empty: name at least one architecture with at least one knob value")
    for name in ("tokens", "batch_size", "context_size", "eval_tokens"):
        _positive_int(name, getattr(grid, name))
    if grid.capture_tokens is not None:
        _positive_int("capture_tokens", grid.capture_tokens)
    if not (math.isfinite(grid.lr) and grid.lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {grid.lr!r}")
    for seed in grid.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seeds must be ints, got {seed!r}")
    labels = [a.name for a in grid.archs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two lines share a name in {labels}; give one a distinct 'label'")
    for a in grid.archs:
        if a.architecture not in SAE_TRAINING_CLASS_REGISTRY:
            raise ValueError(
                f"unknown architecture {a.architecture!r}; registered: {sorted(SAE_TRAINING_CLASS_REGISTRY)} "
                f"(sae_ext adds {plugin_training_architectures()})"
            )
        cfg_cls = SAE_TRAINING_CLASS_REGISTRY[a.architecture][1]
        fields = {f.name for f in dataclasses.fields(cfg_cls)}
        if a.knob not in fields:
            raise ValueError(
                f"knob {a.knob!r} is not a field of {a.architecture}'s training config {cfg_cls.__name__}; "
                f"its fields: {sorted(fields - {'metadata'})}"
            )
        bad = sorted(set(a.config) - fields)
        if bad:
            raise ValueError(f"{a.architecture}: config fields {bad} do not exist in {cfg_cls.__name__}")
        if not a.values:
            raise ValueError(f"{a.name}: no values for its knob {a.knob!r}")
        _positive_int(f"{a.name}: d_sae", a.d_sae)
        bad_values = [v for v in a.values
                      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
        if bad_values:
            raise ValueError(f"{a.name}: knob values must be finite numbers >= 0 (a sparsity setting), got {bad_values}")
        for v in a.values:  # build each config once now, so a bad value fails before any work
            try:
                cfg_cls(d_in=d_in or a.d_sae, d_sae=a.d_sae, **{**a.config, a.knob: v})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{a.name} with {a.knob}={v!r}: {e}") from None
    return grid


def grid_from_dict(data: dict[str, Any]) -> SweepGrid:
    """A :class:`SweepGrid` from a parsed config file (JSON, TOML or YAML); see ``docs/sweep.md``."""
    if not isinstance(data, dict):
        raise ValueError(f"a sweep config must be a mapping, got {type(data).__name__}")
    allowed = {f.name for f in dataclasses.fields(SweepGrid)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown sweep settings {unknown}; allowed: {sorted(allowed)}")
    archs = []
    arch_fields = {f.name for f in dataclasses.fields(ArchSweep)}
    for i, a in enumerate(data.get("archs") or []):
        if not isinstance(a, dict) or not {"architecture", "d_sae", "knob", "values"} <= set(a):
            raise ValueError(f"archs[{i}] needs 'architecture', 'd_sae', 'knob' and 'values', got {a!r}")
        extra = sorted(set(a) - arch_fields)
        if extra:
            raise ValueError(f"archs[{i}]: unknown keys {extra}; allowed: {sorted(arch_fields)}")
        seeds = a.get("seeds")
        archs.append(ArchSweep(**{**a, "values": tuple(a["values"]), "seeds": tuple(seeds) if seeds else None,
                                  "config": dict(a.get("config") or {})}))
    rest = {k: v for k, v in data.items() if k != "archs"}
    if "seeds" in rest:
        rest["seeds"] = tuple(rest["seeds"])
    if "name" not in rest or "hook" not in rest:
        raise ValueError("a sweep config needs 'name' and 'hook'")
    return validate_grid(SweepGrid(archs=tuple(archs), **rest))


def load_grid(path: str | Path) -> SweepGrid:
    """Read a sweep config file: ``.json``, ``.toml`` or ``.yaml`` / ``.yml``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no sweep config at {p}")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
    elif p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError("TOML sweep configs need Python >= 3.11; use JSON or YAML") from None
        data = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"sweep config must end in .json, .toml, .yaml or .yml, got {p.name!r}")
    return grid_from_dict(data)


def parse_arch_flag(spec: str) -> ArchSweep:
    """``ARCH:KNOB=V1,V2,…:d_sae=N[:label=NAME]`` → an :class:`ArchSweep` (the ``--arch`` flag)."""
    parts = spec.split(":")
    if len(parts) < 3 or "=" not in parts[1]:
        raise ValueError(f"--arch must look like 'topk:k=16,32,64:d_sae=1152', got {spec!r}")
    knob, values = parts[1].split("=", 1)
    opts = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
    if "d_sae" not in opts:
        raise ValueError(f"--arch {spec!r} needs d_sae=N")

    def num(v: str) -> float | int:
        return int(v) if v.lstrip("-").isdigit() else float(v)

    return ArchSweep(parts[0], int(opts.pop("d_sae")), knob, tuple(num(v) for v in values.split(",") if v),
                     label=opts.pop("label", None), config={k: num(v) if v[:1].isdigit() else v for k, v in opts.items()})


# ---------------------------------------------------------------------------------------- runs


def run_key(grid: SweepGrid, arch: ArchSweep, value: float | int, seed: int, captured_tokens: int) -> dict[str, Any]:
    """Everything that decides a run's result; a stored run is reused only when this matches."""
    return {
        "hook": grid.hook, "architecture": arch.architecture, "line": arch.name, "d_sae": arch.d_sae,
        "knob": arch.knob, "value": value, "config": arch.config, "seed": seed, "tokens": grid.tokens,
        "batch_size": grid.batch_size, "lr": grid.lr, "context_size": grid.context_size,
        "captured_tokens": captured_tokens, "eval_tokens": grid.eval_tokens,
        # the protocol's lr schedule and the separate half-budget run (v1 runs: constant lr, checkpoint)
        "lr_schedule": [LR_WARM_UP_FRACTION, LR_DECAY_FRACTION], "half_budget": "run",
    }


def run_dir(root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return root / f"{key['line']}_{key['knob']}-{key['value']}_seed{key['seed']}_{digest}"


def _record(key: dict[str, Any], res: Any, conv: Any, seconds: float) -> dict[str, Any]:
    from sae_ext.eval_result import json_safe

    ev, dic = res.run_evals, res.dictionary
    return json_safe({
        **key,
        "l0": ev.l0,
        "r2": conv.r2,
        "r2_half": conv.r2_half,
        "half_budget_tokens": conv.half_budget_tokens,
        "converged": conv.converged,
        "explained_variance_run_evals": ev.explained_variance,
        "ce_loss_recovered": ev.ce_loss_score,
        "kl_score": ev.kl_div_score,
        "ce_clean": ev.ce_loss_without_sae,
        "ce_sae": ev.ce_loss_with_sae,
        "dead_fraction": dic.dead_fraction,
        "dense_fraction": dic.dense_fraction,
        "bipolar_fraction": dic.bipolar_fraction,
        "mean_group_stable_rank": dic.mean_group_stable_rank,
        "train_seconds": seconds,
    })


def run_sweep(
    grid: SweepGrid,
    model: Any,
    train_rows: Any,
    eval_rows: Any,
    out_dir: str | Path,
    results_dir: str | Path,
    *,
    special_tokens: list[int] | None = None,
    model_name: str = "model",
) -> list[dict[str, Any]]:
    """Train and evaluate every run of ``grid`` (reusing finished ones) and write the report.

    ``special_tokens`` (default: the model tokenizer's special ids) are excluded from training,
    statistics and splices (SPEC §8). Returns the records, one per run.
    """
    from sae_lens import SAE
    from sae_lens.registry import get_sae_training_class
    from tqdm.auto import tqdm

    from sae_ext.capture import capture_activations, hook_width
    from sae_ext.convergence import run_convergence, train_with_half_budget
    from sae_ext.evaluate import evaluate_sae
    from sae_ext.protocol import resolve_special_tokens

    validate_grid(grid, d_in=hook_width(model, grid.hook))
    special = resolve_special_tokens(model, special_tokens if special_tokens is not None else True)
    out, results = Path(out_dir), Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    cap_tokens = grid.capture_tokens or len(train_rows) * grid.context_size
    cache = capture_activations(model, train_rows, grid.hook, out / "capture_train", cap_tokens, model_name=model_name)
    eval_cache = capture_activations(model, eval_rows, grid.hook, out / "capture_eval", model_name=model_name)
    x_eval = eval_cache.activations()[~torch.isin(eval_cache.token_ids(), torch.tensor(special or [], dtype=torch.long))]
    records: list[dict[str, Any]] = []
    for arch, value, seed in tqdm(grid.runs(), desc=f"sweep {grid.name}", unit="run"):
        key = run_key(grid, arch, value, seed, cache.n_tokens)
        d = run_dir(out / "runs", key)
        done = d / "record.json"
        if done.exists() and json.loads(done.read_text()).get("key") == key:
            records.append(json.loads(done.read_text())["record"])
            continue
        cfg = get_sae_training_class(arch.architecture)[1](d_in=cache.d_in, d_sae=arch.d_sae,
                                                           **{**arch.config, arch.knob: value})
        t = time.perf_counter()
        train_with_half_budget(cfg, cache, model, d, training_tokens=grid.tokens,
                               train_batch_size_tokens=grid.batch_size, lr=grid.lr, seed=seed,
                               exclude_special_tokens=special)
        seconds = time.perf_counter() - t
        conv = run_convergence(d, x_eval)
        res = evaluate_sae(SAE.load_from_disk(d), model, eval_rows, n_tokens=min(grid.eval_tokens, len(eval_rows) * grid.context_size),
                           splices=False, special_tokens=special, progress=False)
        rec = _record(key, res, conv, seconds)
        done.write_text(json.dumps({"key": key, "record": rec}, indent=2))
        records.append(rec)
        write_report(grid.name, records, results)  # partial results survive an interrupted grid
    write_report(grid.name, records, results)
    return records


# -------------------------------------------------------------------------------------- report


def _line(records: list[dict[str, Any]], line: str, metric: str) -> list[tuple[float, float]]:
    """(L0, metric) of one line's converged runs, seeds averaged per knob value, sorted by L0."""
    by_value: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        if r["line"] == line and r["converged"] and r.get(metric) is not None and (r.get("l0") or 0) > 0:
            by_value.setdefault(r["value"], []).append(r)
    pts = [(sum(r["l0"] for r in rs) / len(rs), sum(r[metric] for r in rs) / len(rs)) for rs in by_value.values()]
    return sorted(pts)


def write_report(name: str, records: list[dict[str, Any]], results_dir: str | Path) -> dict[str, Path]:
    """``<name>.json`` (records and matched-L0 gaps), ``<name>.md`` and one plot per curve metric."""
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    lines = sorted({r["line"] for r in records})
    gaps = {
        metric: {
            f"{a} − {b}": g
            for a, b in itertools.permutations(lines, 2)
            if a < b and (g := matched_gap(_line(records, a, metric), _line(records, b, metric))) is not None
        }
        for metric in CURVE_METRICS
    }
    (results / f"{name}.json").write_text(json.dumps({"runs": records, "matched_l0_gaps": gaps}, indent=2))
    paths = {"json": results / f"{name}.json", "md": results / f"{name}.md"}
    cols = ["line", "knob", "value", "seed", "d_sae", "l0", "r2", "r2_half", "converged", "ce_loss_recovered",
            "kl_score", "dead_fraction", "dense_fraction", "bipolar_fraction", "mean_group_stable_rank"]

    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    md = [f"# Sweep `{name}`", "",
          "One row per run (SPEC §8: special tokens out, dead window 10 % of the run, R² on held-out tokens "
          "at half and full budget; unconverged runs are kept here but left out of the curves and gaps).", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in sorted(records, key=lambda r: (r["line"], r["l0"] or 0))]
    md += ["", "## Matched-L0 gaps (a − b, interpolated in log L0 over the overlap)", ""]
    for metric, pairs in gaps.items():
        for pair, g in pairs.items():
            md.append(f"- {CURVE_METRICS[metric]}, {pair}: mean {g['mean_gap']:+.4f} (min {g['min_gap']:+.4f}, "
                      f"max {g['max_gap']:+.4f}) over L0 {g['l0_low']:.1f}–{g['l0_high']:.1f}")
    for metric, label in CURVE_METRICS.items():
        png = results / f"{name}_{metric}.png"
        plot_curves(records, metric, label, png, title=f"{name}: {label} vs L0")
        paths[metric] = png
        md += ["", f"![{label} vs L0]({png.name})"]
    paths["md"].write_text("\n".join(md) + "\n")
    return paths


def plot_curves(records: list[dict[str, Any]], metric: str, label: str, path: Path, title: str) -> None:
    """One line per architecture (converged runs, filled markers; unconverged hollow), log-L0 axis,
    the Pareto frontier of all converged runs as a dashed black line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for line in sorted({r["line"] for r in records}):
        pts = _line(records, line, metric)
        (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=line)
        loose = [r for r in records if r["line"] == line and not r["converged"] and r.get(metric) is not None]
        if loose:
            ax.scatter([r["l0"] for r in loose], [r[metric] for r in loose], facecolors="none", edgecolors=h.get_color())
    every = [(r["l0"], r[metric]) for r in records if r["converged"] and r.get(metric) is not None and (r["l0"] or 0) > 0]
    front = pareto_front(every)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], "k--", where="post", lw=1, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set(xlabel="L0 (log)", ylabel=label, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- CLI


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="grid file (.json/.toml/.yaml); or give --name/--hook/--arch")
    p.add_argument("--name", help="grid name (results file name)")
    p.add_argument("--hook", help="TransformerLens hook, e.g. blocks.15.hook_mlp_out")
    p.add_argument("--arch", action="append", default=[], metavar="ARCH:KNOB=V1,V2:d_sae=N",
                   help="one line of the grid, repeatable; e.g. topk:k=16,32,64:d_sae=1152")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tokens", type=int, default=3_000_000, help="training tokens per SAE (SPEC §8)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--out", default="sae_ext_out/sweeps", help="where captures and SAEs are kept (resume)")
    p.add_argument("--results", default="benchmarks/results/sweeps", help="where the report goes")


def run_sweep_command(args: argparse.Namespace) -> int:
    """``sae-ext sweep`` on the embedded SmolLM2 and its text."""
    if args.config:
        grid = load_grid(args.config)
    else:
        if not (args.name and args.hook and args.arch):
            raise ValueError("give --config FILE, or --name, --hook and at least one --arch")
        grid = validate_grid(SweepGrid(
            name=args.name, hook=args.hook, archs=tuple(parse_arch_flag(a) for a in args.arch),
            seeds=tuple(args.seeds), tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
            eval_tokens=args.eval_tokens,
        ))
    from sae_ext.data import default_token_dataset
    from sae_ext.models import DEFAULT_MODEL_NAME, load_default_model

    model = load_default_model()
    train = default_token_dataset(model.tokenizer, grid.context_size, n_tokens=grid.capture_tokens, split="train")
    ev = default_token_dataset(model.tokenizer, grid.context_size, n_tokens=grid.eval_tokens, split="eval")
    records = run_sweep(grid, model, train, ev, Path(args.out) / grid.name, args.results, model_name=DEFAULT_MODEL_NAME)
    print(f"{len(records)} runs; report: {Path(args.results) / grid.name}.md")
    return 0
