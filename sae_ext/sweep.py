"""`sae-ext sweep`: sparsity sweeps of several architectures on one capture, and their L0 curves.

A grid names one hook and, per architecture, its width, its sparsity knob (a field of its training
config: ``k``, ``l1_coefficient``, ``l0_coefficient``, ``target_l0``, ``n_active_groups`` …) and the
knob's values; every (architecture, value, seed) is trained with :func:`sae_ext.capture.train_on_cache`
under SPEC §8 on one capture of the hook, evaluated on held-out tokens
(:func:`sae_ext.evaluate.evaluate_sae`: L0, R², CE and KL loss recovered via ``run_evals``, dead,
dense, bipolar and group statistics, dark-matter error / norm R²) and checked for convergence (R² at half budget). One JSON
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
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_ext.metrics.curves import matched_gap, pareto_front
from sae_ext.protocol import LR_DECAY_FRACTION, LR_WARM_UP_FRACTION, default_training_tokens

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
    batch_size: int | None = None  # None: the grid's (a threshold line may need more, smaller steps)
    tokens: int | None = None  # None: the grid's budget
    # the curve its converged runs join in the plots and matched-L0 gaps (default: its own name): the
    # same SAE at another budget, e.g. a sparse end that needs more tokens to converge
    curve: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.architecture

    @property
    def curve_name(self) -> str:
        return self.curve or self.name


@dataclass(frozen=True)
class SweepGrid:
    """A whole sweep: one hook, the architectures' lines, the protocol's budget."""

    name: str
    hook: str
    archs: tuple[ArchSweep, ...]
    seeds: tuple[int, ...] = (0,)
    tokens: int | None = None  # None: SPEC §8's measured budget for the hook's kind (set on creation)
    batch_size: int = 1024
    lr: float = 1e-3
    context_size: int = 128
    capture_tokens: int | None = None  # None: the whole train split
    eval_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.tokens is None:  # SPEC §8's measured budget for this kind of hook
            object.__setattr__(self, "tokens", default_training_tokens(self.hook))

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
        if a.curve is not None and a.curve not in labels:
            raise ValueError(f"{a.name}: curve must name a line of the grid, got {a.curve!r}; the lines: {labels}")
        joined = [b for b in grid.archs if b.curve_name == a.curve_name]
        if any((b.architecture, b.d_sae, b.knob, b.config) != (a.architecture, a.d_sae, a.knob, a.config) for b in joined):
            raise ValueError(
                f"lines {[b.name for b in joined]} share the curve {a.curve_name!r} but differ in architecture, "
                "d_sae, knob or config; a curve joins one SAE setting (its lines may differ in tokens, "
                "batch_size, seeds and values)"
            )
        cfg_cls = _training_config_class(a.architecture)
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
        for name in ("batch_size", "tokens"):
            if getattr(a, name) is not None:
                _positive_int(f"{a.name}: {name}", getattr(a, name))
        bad_values = [v for v in a.values
                      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
        if bad_values:
            raise ValueError(f"{a.name}: knob values must be finite numbers >= 0 (a sparsity setting), got {bad_values}")
        sae_cls = SAE_TRAINING_CLASS_REGISTRY[a.architecture][0]
        for i, v in enumerate(a.values):  # build each config once now, so a bad value fails before any work
            try:
                cfg = cfg_cls(d_in=d_in or a.d_sae, d_sae=a.d_sae, **{**a.config, a.knob: v})
                if i == 0:  # and one SAE: some architectures check their config only when built
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        sae_cls(cfg)
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


#: Training-config fields a run's result does not depend on (left out of its resolved config).
_UNRESOLVED_FIELDS = frozenset({"device", "metadata"})

#: Defaults that changed after run keys began to hold the resolved training config: architecture →
#: field → the default a stored run without ``resolved_config`` was trained with where its line
#: left the field unset. List a default here when changing it, so those runs keep their meaning.
PRE_RESOLVED_DEFAULTS: dict[str, dict[str, Any]] = {
    "sasa": {"nuclear_coefficient": 1.0},
    "sasa_batchtopk": {"nuclear_coefficient": 1.0},
}


def _training_config_class(architecture: str) -> type:
    """``architecture``'s SAELens training-config class; one clear error for an unregistered name."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_ext.registry import plugin_training_architectures

    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(
            f"unknown architecture {architecture!r}; registered: {sorted(SAE_TRAINING_CLASS_REGISTRY)} "
            f"(sae_ext adds {plugin_training_architectures()})"
        )
    return SAE_TRAINING_CLASS_REGISTRY[architecture][1]


def _resolved_config(architecture: str, d_in: int, d_sae: int, config: dict[str, Any]) -> dict[str, Any]:
    """The training config a run of ``architecture`` builds from ``config`` (knob included), every
    default filled in, as JSON values: what the run key compares, so a changed default never
    passes a stored run off as the new setting."""
    cfg = _training_config_class(architecture)(d_in=d_in, d_sae=d_sae, **config)
    return json.loads(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in _UNRESOLVED_FIELDS}))


def _line_config(entry: dict[str, Any]) -> dict[str, Any]:
    """The config a run stored without ``resolved_config`` set explicitly (its line's config and knob
    value) over the defaults of its time that have changed since."""
    return {**PRE_RESOLVED_DEFAULTS.get(entry["architecture"], {}), **(entry.get("config") or {}),
            entry["knob"]: entry["value"]}


def run_key(grid: SweepGrid, arch: ArchSweep, value: float | int, seed: int, captured_tokens: int, *,
            d_in: int) -> dict[str, Any]:
    """Everything that decides a run's result; a stored run is reused only when this matches
    (:func:`record_matches`). ``d_in`` is the hook's width."""
    return {
        "hook": grid.hook, "architecture": arch.architecture, "line": arch.name, "d_sae": arch.d_sae,
        "knob": arch.knob, "value": value, "config": arch.config, "seed": seed,
        "tokens": arch.tokens or grid.tokens, "batch_size": arch.batch_size or grid.batch_size,
        "lr": grid.lr, "context_size": grid.context_size,
        "captured_tokens": captured_tokens, "eval_tokens": grid.eval_tokens,
        # the protocol's lr schedule and the separate half-budget run (v1 runs: constant lr, checkpoint)
        "lr_schedule": [LR_WARM_UP_FRACTION, LR_DECAY_FRACTION], "half_budget": "run",
        "resolved_config": _resolved_config(arch.architecture, d_in, arch.d_sae, {**arch.config, arch.knob: value}),
    }


def run_dir(root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return root / f"{key['line']}_{key['knob']}-{key['value']}_seed{key['seed']}_{digest}"


def _record(key: dict[str, Any], res: Any, conv: Any, seconds: float, device: str = "cpu") -> dict[str, Any]:
    from sae_ext.eval_result import json_safe

    ev, dic, dm = res.run_evals, res.dictionary, res.dark_matter
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
        "mean_live_group_stable_rank": dic.mean_live_group_stable_rank,
        # SPEC §4 on the held-out non-special tokens (every one, massive tokens included)
        "dark_matter_error_r2": dm.error_r2,
        "dark_matter_norm_r2": dm.norm_r2,
        "train_seconds": seconds,
        "device": device,
    })


@dataclass(frozen=True)
class _Task:
    """One run of a grid, with everything a worker process needs to train and evaluate it."""

    grid: SweepGrid
    arch: ArchSweep
    value: float | int
    seed: int
    key: dict[str, Any]
    run_dir: str
    train_capture: str
    eval_capture: str
    eval_tokens: torch.Tensor  # [rows, context] held-out token ids for run_evals
    special: list[int]
    device: str


#: Set in each worker process by :func:`_init_worker`: the model, and held-out activations by capture.
_WORKER: dict[str, Any] = {}


def _init_worker(model_loader: Callable[[], Any], threads: int) -> None:
    torch.set_num_threads(threads)
    import sae_ext  # noqa: F401  (registers the plugin architectures in the new process)

    _WORKER["model"] = model_loader()


def _heldout_activations(capture: str, hook: str, special: list[int], device: str) -> torch.Tensor:
    """The held-out activations of ``capture`` at ``hook`` with special-token positions removed (cached per process)."""
    from sae_ext.capture import ActivationCache

    key = f"x_eval:{capture}:{hook}:{device}"
    if key not in _WORKER:
        _WORKER[key] = ActivationCache.load(capture, hook).kept_activations(special).to(device)
    return _WORKER[key]


def _run_one(task: _Task, model: Any | None = None) -> dict[str, Any]:
    """Train ``task``'s SAE and its half-budget twin, evaluate it, write its ``record.json``."""
    from sae_lens import SAE
    from sae_lens.registry import get_sae_training_class

    from sae_ext.capture import ActivationCache
    from sae_ext.convergence import run_convergence, train_with_half_budget
    from sae_ext.evaluate import evaluate_sae

    model = _WORKER["model"] if model is None else model
    grid, arch, d = task.grid, task.arch, Path(task.run_dir)
    cache = ActivationCache.load(task.train_capture, grid.hook)
    cfg = get_sae_training_class(arch.architecture)[1](d_in=cache.d_in, d_sae=arch.d_sae,
                                                       **{**arch.config, arch.knob: task.value})
    half_from = _finished_half_run(d.parent, task.key)
    t = time.perf_counter()
    train_with_half_budget(cfg, cache, model, d, training_tokens=task.key["tokens"], half_budget_from=half_from,
                           train_batch_size_tokens=task.key["batch_size"], lr=grid.lr, seed=task.seed,
                           exclude_special_tokens=task.special, device=task.device)
    seconds = time.perf_counter() - t
    x_eval = _heldout_activations(task.eval_capture, grid.hook, task.special, task.device)
    conv = run_convergence(d, x_eval, device=task.device)
    n_eval = min(grid.eval_tokens, task.eval_tokens.numel())
    res = evaluate_sae(SAE.load_from_disk(d, device=task.device), model, task.eval_tokens, n_tokens=n_eval,
                       splices=False, special_tokens=task.special, progress=False)
    rec = {**_record(task.key, res, conv, seconds, _device_name(task.device)),
           "half_budget_from": half_from.name if half_from else None}
    (d / "record.json").write_text(json.dumps({"key": task.key, "record": rec}, indent=2))
    return rec


def _finished_half_run(runs: Path, key: dict[str, Any]) -> Path | None:
    """A finished run under ``runs`` of ``key``'s setting at half its tokens (any line name: a
    line at a doubled budget reuses the shorter line's run as its half-budget twin), or ``None``."""
    if key["tokens"] < 2:
        return None
    want = {k: v for k, v in {**key, "tokens": key["tokens"] // 2}.items() if k != "line"}
    return next((d for stored, d in _saved_run_keys(runs) if record_matches(want, stored)), None)


def _device_name(device: str) -> str:
    """``device`` with the accelerator's name (``train_seconds`` means little without it)."""
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def _stored(task: _Task, reported: list[dict[str, Any]], saved: list[tuple[dict[str, Any], Path]]
            ) -> dict[str, Any] | None:
    """The finished record of ``task``: from its run folder, else from the grid's report (a record
    holds its whole key), so a report committed from another machine resumes the grid too."""
    done = Path(task.run_dir) / "record.json"
    if done.exists():
        stored = json.loads(done.read_text())
        if stored.get("key") == task.key:
            return stored["record"]
    # a run of the same setting in another folder of ``saved`` (the grid's saved runs: made before
    # keys held the resolved config, or by a line that now spells out a default)
    for key, d in saved:
        if record_matches(task.key, key):
            return json.loads((d / "record.json").read_text())["record"]
    return next((r for r in reported if record_matches(task.key, r)), None)


def record_matches(key: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether ``record`` (a report's record or a run's key) was made with exactly ``key``.

    The training configs are compared resolved (every default filled in), not as the lines wrote
    them: a line that spells out a default matches the run made without it, and a run made under a
    default that has since changed no longer matches a line that leaves it unset. A record from
    before keys held the resolved config is resolved with the defaults of its time
    (:data:`PRE_RESOLVED_DEFAULTS`); two such records compare as written.
    """
    key = json.loads(json.dumps(key))
    if "resolved_config" not in key and "resolved_config" not in record:
        return all(record.get(k) == v for k, v in key.items())
    if any(record.get(k) != v for k, v in key.items() if k not in ("config", "resolved_config")):
        return False
    d_in = (key.get("resolved_config") or record["resolved_config"])["d_in"]
    try:
        return _resolved_of(key, d_in) == _resolved_of(record, d_in)
    except (KeyError, TypeError, ValueError):  # a stored config this code can no longer build
        return False


def _resolved_of(entry: dict[str, Any], d_in: int) -> dict[str, Any]:
    """``entry``'s resolved training config; for an entry from before keys held it, rebuilt from
    its line's config over the defaults of its time."""
    if "resolved_config" in entry:
        return entry["resolved_config"]
    return _resolved_config(entry["architecture"], d_in, entry["d_sae"], _line_config(entry))


def config_value(record: dict[str, Any], name: str) -> Any:
    """A run's training-config field ``name`` as it was trained: from its resolved config, else (a
    record from before keys held it) its knob or line config, else the default of its time."""
    if "resolved_config" in record:
        config = record["resolved_config"]
    else:
        missing = sorted({"architecture", "knob", "value"} - set(record))
        if missing:
            raise ValueError(f"not a sweep run's record or key: it has no resolved_config and no {missing}")
        defaults = {f.name: f.default for f in dataclasses.fields(_training_config_class(record["architecture"]))
                    if f.default is not dataclasses.MISSING}
        config = {**defaults, **_line_config(record)}
    if name not in config:
        raise KeyError(f"{record.get('architecture', 'this')} run has no training-config value {name!r}; "
                       f"its fields: {sorted(config)}")
    return config[name]


def check_only(only: list[str] | None, grids: list[SweepGrid]) -> None:
    """ValueError unless ``only`` (None: every line) names one or more lines (labels) of ``grids``."""
    all_lines = sorted({a.name for g in grids for a in g.archs})
    if only is not None and (not only or set(only) - set(all_lines)):
        raise ValueError(f"only must name lines of the grids, got {only!r}; the lines: {all_lines}")


def add_report_arguments(p: argparse.ArgumentParser, results_default: str | Path, *, only: bool = False) -> None:
    """``--grid``, ``--results`` and ``--out``: where a script that reads a finished sweep finds its
    grid, its report and its saved SAEs (the sweep's own ``--out``). With ``only``, also ``--only``
    for a bench that keeps its earlier rows (:func:`keep_earlier`): measure the saved runs of some
    lines again and keep the earlier rows of the others."""
    p.add_argument("--grid", type=Path, required=True, help="the sweep grid (TOML/YAML/JSON) the runs came from")
    p.add_argument("--results", type=Path, default=Path(results_default), help="where the sweep report is")
    p.add_argument("--out", type=Path, default=Path("sae_ext_out/sweeps"), help="the sweep's --out (saved SAEs)")
    if only:
        p.add_argument("--only", nargs="+", default=None, metavar="LINE",
                       help="measure only these lines' saved runs; the earlier report's rows of the others are kept")


def finished_report(grid_path: str | Path, results_dir: str | Path) -> tuple[SweepGrid, Path, list[dict[str, Any]]]:
    """The grid at ``grid_path``, its report's path under ``results_dir`` and the report's records."""
    grid = load_grid(grid_path)
    report = Path(results_dir) / f"{grid.name}.json"
    if not report.is_file():
        raise FileNotFoundError(f"no sweep report {report}: run `sae-ext sweep --config {grid_path}` first")
    return grid, report, json.loads(report.read_text())["runs"]


def _saved_run_keys(runs: str | Path) -> list[tuple[dict[str, Any], Path]]:
    """``(key, folder)`` of every run under ``runs`` whose record is readable and SAE saved."""
    from sae_lens.constants import SAE_WEIGHTS_FILENAME

    runs = Path(runs)
    saved = []
    for rec in sorted(runs.glob("*/record.json")) if runs.is_dir() else []:
        try:
            key = json.loads(rec.read_text())["key"]
        except (json.JSONDecodeError, KeyError):
            continue
        if (rec.parent / SAE_WEIGHTS_FILENAME).is_file():
            saved.append((key, rec.parent))
    return saved


def saved_runs(records: list[dict[str, Any]], runs: str | Path, *, converged_only: bool = True,
               only: list[str] | None = None) -> list[tuple[dict[str, Any], Path]]:
    """The converged ``records`` of a report (every record with ``converged_only=False``, for
    diagnosing the runs that failed) of the lines ``only`` names (None: every line) paired with
    their saved SAE folder under ``runs`` (a grid's ``<out>/<name>/runs``); a record without one
    is skipped with a note."""
    saved = _saved_run_keys(runs)
    found = []
    for r in records:
        if (converged_only and not r["converged"]) or (only is not None and r["line"] not in only):
            continue
        d = next((d for key, d in saved if record_matches(key, r)), None)
        if d is None:
            print(f"skipped {r['line']} {r['knob']}={r['value']} seed {r['seed']}: no saved SAE under {runs}")
        else:
            found.append((r, d))
    return found


def keep_earlier(new: list[dict[str, Any]], earlier: list[dict[str, Any]], records: list[dict[str, Any]],
                 ident: Callable[[dict[str, Any]], tuple[Any, ...]],
                 record_ident: Callable[[dict[str, Any]], tuple[Any, ...]]) -> list[dict[str, Any]]:
    """``new`` (a bench's rows of this call) plus the rows of its earlier report that measured a
    converged run of ``records`` (``ident(row) == record_ident(record)``) not measured again here,
    marked ``"earlier": True``: a bench re-run where earlier SAEs are no longer saved keeps them."""
    current = {record_ident(r) for r in records if r["converged"]}
    done = {ident(r) for r in new}
    return new + [{**r, "earlier": True} for r in earlier if ident(r) in current and ident(r) not in done]


def finished_saved_runs(grid_path: str | Path, results_dir: str | Path, out: str | Path, *,
                        converged_only: bool = True, only: list[str] | None = None,
                        ) -> tuple[SweepGrid, Path, list[tuple[dict[str, Any], Path]]]:
    """:func:`finished_report`'s grid and report path, with the converged (or, ``converged_only=False``,
    all) records of the lines ``only`` names (None: every line) paired with their saved SAE under
    ``out/<grid name>/runs`` (:func:`saved_runs`); FileNotFoundError when none is saved."""
    grid, report, records = finished_report(grid_path, results_dir)
    check_only(only, [grid])
    runs = Path(out) / grid.name / "runs"
    found = saved_runs(records, runs, converged_only=converged_only, only=only)
    if not found:
        which = "converged run" if converged_only else "run"
        raise FileNotFoundError(f"no {which} of {report} has a saved SAE under {runs}")
    return grid, report, found


def run_sweeps(
    grids: list[SweepGrid],
    model: Any,
    train_rows: Any,
    eval_rows: Any,
    out_dir: str | Path,
    results_dir: str | Path,
    *,
    special_tokens: list[int] | None = None,
    model_name: str = "model",
    device: str = "cpu",
    workers: int = 1,
    model_loader: Callable[[], Any] | None = None,
    deadline_s: float | None = None,
    capture_dtype: str = "float16",
    capture_batch_size: int = 8,
    only: list[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train and evaluate every run of ``grids`` (reusing finished ones) and write one report per grid.

    The hooks are captured in one model pass under ``out_dir/captures/{train,eval}`` (stored as
    ``capture_dtype``: float16 kept held-out R² within 0.001 of float32, RESULTS §0) and shared by
    every grid; a later call needing another hook captures only that one. Runs live in
    ``out_dir/<grid>/runs``. ``special_tokens`` (default: the model
    tokenizer's special ids) are excluded from training, statistics and splices (SPEC §8). Runs of
    different grids are interleaved (first value of every line of every grid, then the second …),
    so a grid cut short by ``deadline_s`` (seconds after which no new run starts) still has every
    line. ``workers > 1`` trains that many runs at once in worker processes, each holding its own
    model from ``model_loader`` (a picklable callable, e.g. ``functools.partial(load_default_model,
    device="cuda")``): one GPU is mostly idle under one small SAE. ``only`` names the lines to
    train (the other lines' finished runs stay in the reports). Returns the records per grid.
    """
    from tqdm.auto import tqdm

    from sae_ext.capture import STORAGE_DTYPES, hook_width
    from sae_ext.model_io import as_token_tensor
    from sae_ext.protocol import resolve_special_tokens

    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if workers > 1 and model_loader is None:
        raise ValueError("workers > 1 needs model_loader: each worker process loads its own model")
    if deadline_s is not None and not (math.isfinite(deadline_s) and deadline_s > 0):
        raise ValueError(f"deadline_s must be a finite number of seconds > 0, got {deadline_s!r}")
    if not grids:
        raise ValueError("no grids to run")
    if capture_dtype not in STORAGE_DTYPES:
        raise ValueError(f"capture_dtype must be one of {sorted(STORAGE_DTYPES)}, got {capture_dtype!r}")
    _positive_int("capture_batch_size", capture_batch_size)
    names = [g.name for g in grids]
    if len(set(names)) != len(names):
        raise ValueError(f"two grids share a name in {names}")
    for grid in grids:
        validate_grid(grid, d_in=hook_width(model, grid.hook))
    check_only(only, grids)
    if len({g.context_size for g in grids}) != 1:
        raise ValueError(f"grids run together need one context_size, got {sorted({g.context_size for g in grids})}")
    special = resolve_special_tokens(model, special_tokens if special_tokens is not None else True)
    special = list(special or [])
    started = time.monotonic()
    out, results = Path(out_dir), Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_tokens = as_token_tensor(eval_rows)
    eval_tokens = eval_tokens[: math.ceil(max(g.eval_tokens for g in grids) / eval_tokens.shape[1])]
    hooks = list(dict.fromkeys(g.hook for g in grids))
    cap_tokens = max(g.capture_tokens or len(train_rows) * g.context_size for g in grids)
    kw = {"model_name": model_name, "dtype": capture_dtype, "batch_size_prompts": capture_batch_size}
    context = grids[0].context_size
    train_caps = _shared_captures(model, train_rows, hooks, out / "captures" / "train", cap_tokens, context, **kw)
    eval_caps = _shared_captures(model, eval_rows, hooks, out / "captures" / "eval", len(eval_rows) * context,
                                 context, **kw)
    per_grid: list[list[_Task]] = []
    for grid in grids:
        cache, eval_cache = train_caps[grid.hook], eval_caps[grid.hook]
        tasks = []
        for arch, value, seed in grid.runs():
            key = {**run_key(grid, arch, value, seed, cache.n_tokens, d_in=cache.d_in), "capture_dtype": cache.dtype}
            tasks.append(_Task(grid, arch, value, seed, key, str(run_dir(out / grid.name / "runs", key)), cache.path,
                               eval_cache.path, eval_tokens, special, device))
        per_grid.append(tasks)
    order = [t for batch in itertools.zip_longest(*[_by_value_rank(ts) for ts in per_grid]) for ts in batch if ts
             for t in ts]
    records: dict[str, list[dict[str, Any]]] = {g.name: [] for g in grids}
    reported = {g.name: _reported_runs(results / f"{g.name}.json") for g in grids}
    # reported runs no task of this call matches (another capture dtype, budget, knob value …) stay in
    # the report, apart from the curves, so a call with other settings never deletes finished results
    others = {g.name: [r for r in reported[g.name] if not any(record_matches(t.key, r) for t in ts)]
              for g, ts in zip(grids, per_grid)}
    todo = []
    saved = {g.name: _saved_run_keys(out / g.name / "runs") for g in grids}
    for task in order:
        rec = _stored(task, reported[task.grid.name], saved[task.grid.name])
        if rec is None:
            if only is None or task.arch.name in only:
                todo.append(task)
        else:
            records[task.grid.name].append({**rec, "curve": task.arch.curve_name})

    failed: dict[str, list[dict[str, Any]]] = {g.name: [] for g in grids}

    def finished(task: _Task, rec: dict[str, Any] | None, error: BaseException | None = None) -> None:
        name = task.grid.name
        if error is not None:  # one broken run must not cost the rest of the grid
            failed[name].append({**task.key, "error": f"{type(error).__name__}: {error}"})
            print(f"run {task.arch.name} {task.arch.knob}={task.value} seed {task.seed} failed:\n"
                  + "".join(traceback.format_exception(error)))
        else:
            records[name].append({**rec, "curve": task.arch.curve_name})
        write_report(name, records[name], results, failed=failed[name], other_runs=others[name])  # survives a cut

    def late() -> bool:
        return deadline_s is not None and time.monotonic() - started > deadline_s

    bar = tqdm(total=len(todo), desc=f"sweep {'+'.join(names)}", unit="run")
    if workers == 1:
        for task in todo:
            if late():
                break
            try:
                finished(task, _run_one(task, model))
            except Exception as e:  # noqa: BLE001  (recorded in the report, the grid goes on)
                finished(task, None, e)
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        threads = max(1, (torch.get_num_threads() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(model_loader, threads)) as pool:
            queue, running = list(todo), {}
            while queue or running:
                while queue and len(running) < workers and not late():
                    task = queue.pop(0)
                    running[pool.submit(_run_one, task)] = task
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = running.pop(fut)
                    error = fut.exception()
                    finished(task, None if error else fut.result(), error)
                    bar.update()
    bar.close()
    skipped = len(todo) - bar.n
    if skipped:
        print(f"deadline reached: {skipped} run(s) not started; run again to resume")
    n_failed = sum(map(len, failed.values()))
    if n_failed:
        print(f"{n_failed} run(s) failed (listed under 'failed' in the reports); run again to retry them")
    for grid in grids:
        write_report(grid.name, records[grid.name], results, failed=failed[grid.name], other_runs=others[grid.name])
        if others[grid.name]:
            print(f"{grid.name}: {len(others[grid.name])} reported run(s) of other settings kept apart from the curves")
    return records


def _reported_runs(path: Path) -> list[dict[str, Any]]:
    try:
        report = json.loads(path.read_text())
        return list(report.get("runs", [])) + list(report.get("other_runs", []))
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _shared_captures(model: Any, rows: Any, hooks: list[str], root: Path, n_tokens: int, context_size: int,
                     **kwargs: Any) -> dict[str, Any]:
    """One :class:`~sae_ext.capture.ActivationCache` per hook: reused from any capture under ``root``
    that holds it (enough tokens, same model and context), the missing hooks captured together in
    one model pass into a new folder ``root/<n>``."""
    from sae_ext.capture import ActivationCache, capture_hooks

    found: dict[str, ActivationCache] = {}
    existing = sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []
    for folder in existing:
        for hook in hooks:
            if hook in found:
                continue
            try:
                cache = ActivationCache.load(folder, hook)
            except (FileNotFoundError, ValueError):
                continue
            if (cache.model_name, cache.context_size) == (kwargs["model_name"], context_size) and cache.n_tokens >= n_tokens:
                found[hook] = cache
    missing = [h for h in hooks if h not in found]
    if missing:
        found.update(capture_hooks(model, rows, missing, root / str(len(existing)), n_tokens, **kwargs))
    return found


def _by_value_rank(tasks: list[_Task]) -> list[list[_Task]]:
    """``tasks`` grouped by the rank of their knob value within their line: every line's first
    value, then every line's second …, so an interleaved order covers every line early."""
    ranks: dict[int, list[_Task]] = {}
    for t in tasks:
        ranks.setdefault(t.arch.values.index(t.value), []).append(t)
    return [ranks[r] for r in sorted(ranks)]


def run_sweep(
    grid: SweepGrid,
    model: Any,
    train_rows: Any,
    eval_rows: Any,
    out_dir: str | Path,
    results_dir: str | Path,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`run_sweeps` for one grid; returns its records."""
    return run_sweeps([grid], model, train_rows, eval_rows, out_dir, results_dir, **kwargs)[grid.name]


# -------------------------------------------------------------------------------------- report


#: architecture → the architecture its seed paper compares it with (the benches read each run of
#: the first against the second's curve at matched L0 and its run of the same active columns)
BASELINE_ARCHITECTURE = {
    "scaffold_batchtopk": "batchtopk",
    "scaffold_matryoshka_batchtopk": "matryoshka_batchtopk",
    "sasa": "topk",
    "sasa_batchtopk": "batchtopk",
    "sign_aware_gated": "jumprelu",
}


def active_columns(record: dict[str, Any]) -> float | int:
    """A run's knob value in decoder columns a token may use, the value runs of different
    architectures are compared at: SASA's ``n_active_groups`` × ``group_rank`` (s·r = k), any other
    knob as it is (k, or a coefficient compared with the same coefficient)."""
    return record["value"] * group_rank_of(record) if record["knob"] == "n_active_groups" else record["value"]


#: the training architectures whose runs have decoder groups (SASA, SPEC §3)
SASA_ARCHITECTURES = ("sasa", "sasa_batchtopk")


def group_rank_of(record: dict[str, Any]) -> int:
    """A SASA run's group rank r, as it was trained (:func:`config_value`)."""
    return int(config_value(record, "group_rank"))


def curve_of(record: dict[str, Any]) -> str:
    """The curve a record is drawn on: its line's ``curve`` (default: the line)."""
    return record.get("curve") or record["line"]


def curve_points(records: list[dict[str, Any]], curve: str, metric: str) -> list[tuple[float, float]]:
    """(L0, metric) of one curve's converged runs, seeds averaged per line and knob value, sorted by L0."""
    by_value: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        if curve_of(r) == curve and r["converged"] and r.get(metric) is not None and (r.get("l0") or 0) > 0:
            by_value.setdefault((r["line"], r["value"]), []).append(r)
    pts = [(sum(r["l0"] for r in rs) / len(rs), sum(r[metric] for r in rs) / len(rs)) for rs in by_value.values()]
    return sorted(pts)


def write_report(
    name: str, records: list[dict[str, Any]], results_dir: str | Path, failed: list[dict[str, Any]] | None = None,
    other_runs: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """``<name>.json`` (records, matched-L0 gaps, the runs that failed with their error, and
    ``other_runs``: stored records of settings the grid no longer has, kept out of the curves),
    ``<name>.md`` and one plot per curve metric."""
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    lines = sorted({curve_of(r) for r in records})
    gaps = {
        metric: {
            f"{a} − {b}": g
            for a, b in itertools.permutations(lines, 2)
            if a < b and (g := matched_gap(curve_points(records, a, metric), curve_points(records, b, metric))) is not None
        }
        for metric in CURVE_METRICS
    }
    failed, other_runs = failed or [], other_runs or []
    report = {"runs": records, "matched_l0_gaps": gaps, "failed": failed}
    if other_runs:
        report["other_runs"] = other_runs
    (results / f"{name}.json").write_text(json.dumps(report, indent=2))
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
    if failed:
        md += ["", "## Failed runs (retried on the next call)", ""]
        md += [f"- {f['line']} {f['knob']}={f['value']} seed {f['seed']}: {f['error']}" for f in failed]
    if other_runs:
        md += ["", "## Stored runs of other settings (kept in the JSON under `other_runs`, not in the curves)", ""]
        md += [f"- {r['line']} {r['knob']}={r['value']} seed {r['seed']}: tokens {r.get('tokens')}, batch "
               f"{r.get('batch_size')}, capture {r.get('capture_dtype')}" for r in other_runs]
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
    """One line per curve (a line, or the lines its ``curve`` joins): converged runs filled, unconverged
    hollow, log-L0 axis, the Pareto frontier of all converged runs as a dashed black line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for line in sorted({curve_of(r) for r in records}):
        pts = curve_points(records, line, metric)
        (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=line)
        loose = [r for r in records if curve_of(r) == line and not r["converged"] and r.get(metric) is not None]
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
    p.add_argument("--config", action="append", default=[],
                   help="grid file (.json/.toml/.yaml), repeatable: the grids run interleaved on shared "
                        "captures; or give --name/--hook/--arch")
    p.add_argument("--name", help="grid name (results file name)")
    p.add_argument("--hook", help="TransformerLens hook, e.g. blocks.15.hook_mlp_out")
    p.add_argument("--arch", action="append", default=[], metavar="ARCH:KNOB=V1,V2:d_sae=N",
                   help="one line of the grid, repeatable; e.g. topk:k=16,32,64:d_sae=1152")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tokens", type=int, default=None,
                   help="training tokens per SAE (default: SPEC §8's measured budget for the hook's kind, "
                        "sae_ext.protocol.DEFAULT_TRAINING_TOKENS: 2 M at residual hooks, 8 M at attn_out and mlp_out)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--device", default="cpu", help="torch device of the model and the SAEs (cpu, cuda, cuda:1 …)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs trained at once, each in its own process with its own model copy (GPU: 8–12)")
    p.add_argument("--only", nargs="+", default=None, metavar="LINE",
                   help="train only these lines (labels) of the grids; the others' finished runs stay in the reports")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no new run after this many seconds (the rest resumes next time)")
    p.add_argument("--capture-dtype", default="float16", choices=["float16", "float32"],
                   help="storage type of the captured activations")
    p.add_argument("--capture-batch", type=int, default=8, help="rows per model pass when capturing")
    p.add_argument("--out", default="sae_ext_out/sweeps", help="where captures and SAEs are kept (resume)")
    p.add_argument("--results", default="benchmarks/results/sweeps", help="where the report goes")


def run_sweep_command(args: argparse.Namespace) -> int:
    """``sae-ext sweep`` on the embedded SmolLM2 and its text."""
    import functools

    if args.config:
        grids = [load_grid(c) for c in args.config]
    else:
        if not (args.name and args.hook and args.arch):
            raise ValueError("give --config FILE, or --name, --hook and at least one --arch")
        grids = [validate_grid(SweepGrid(
            name=args.name, hook=args.hook, archs=tuple(parse_arch_flag(a) for a in args.arch),
            seeds=tuple(args.seeds), tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
            eval_tokens=args.eval_tokens,
        ))]
    from sae_ext.data import default_token_dataset
    from sae_ext.models import DEFAULT_MODEL_NAME, load_default_model

    model = load_default_model(device=args.device)
    context = grids[0].context_size
    capture = None if any(g.capture_tokens is None for g in grids) else max(g.capture_tokens for g in grids)
    train = default_token_dataset(model.tokenizer, context, n_tokens=capture, split="train")
    ev = default_token_dataset(model.tokenizer, context, n_tokens=max(g.eval_tokens for g in grids), split="eval")
    records = run_sweeps(grids, model, train, ev, args.out, args.results, model_name=DEFAULT_MODEL_NAME,
                         device=args.device, workers=args.workers, deadline_s=args.deadline_s,
                         capture_dtype=args.capture_dtype, capture_batch_size=args.capture_batch, only=args.only,
                         model_loader=functools.partial(load_default_model, device=args.device))
    for name, recs in records.items():
        print(f"{name}: {len(recs)} runs; report: {Path(args.results) / name}.md")
    return 0
