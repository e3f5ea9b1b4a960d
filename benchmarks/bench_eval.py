"""Evaluation time per SAE, before/after the one-engine refactor (issue #20), on SmolLM2.

Runs :func:`sae_ext.evaluate.evaluate_sae` with every splice on the same held-out tokens of the
embedded text, once with the working tree's ``sae_ext`` and once with the ``sae_ext`` of a git
revision (``--ref``, exported with ``git archive`` into a temporary folder and put first on
``PYTHONPATH``), each side in its own process. Per SAE it records the wall time of the
evaluation, the model forwards (counted at the embedding, partial forwards included) and their
count per batch, and a few figures both sides report (CE clean / with SAE, explained variance)
as a sanity check. Writes ``benchmarks/results/TAG.{json,md}``.

The SAEs are saved SAE folders (``--sae-dirs``), or by default random-weight inference SAEs of
``--architectures`` at the model width (``d_sae`` ``--d-sae``), saved once under ``--work`` so
both sides load the very same weights. Time it on a quiet machine:

    nice -n 0 .venv/bin/python benchmarks/bench_eval.py --ref 032bb1d --hook blocks.15.hook_mlp_out \\
        --tokens 8192 --batch-size 8 --repeats 2 --tag eval_time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DEFAULT_ARCHITECTURES = ["standard", "jumprelu", "topk", "scaffold_jumprelu", "sasa", "sign_aware_gated"]


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="032bb1d", help="git revision of the 'before' code (default: the pre-refactor commit)")
    p.add_argument("--hook", default="blocks.15.hook_mlp_out")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens per evaluation")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    p.add_argument("--repeats", type=int, default=1, help="evaluations per SAE and side (the minimum is reported)")
    p.add_argument("--sae-dirs", type=Path, nargs="*", default=None, help="saved SAE folders (default: random SAEs)")
    p.add_argument("--architectures", nargs="*", default=DEFAULT_ARCHITECTURES)
    p.add_argument("--d-sae", type=int, default=1152)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sae_ext_bench_eval")
    p.add_argument("--tag", default="eval_time")
    # internal: one side, in its own process
    p.add_argument("--worker", choices=["before", "after"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("tokens", "batch_size", "repeats", "d_sae"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# ---------------------------------------------------------------------------------------------
# worker: one side
# ---------------------------------------------------------------------------------------------


def _figures(res: Any) -> dict[str, float]:
    """A few figures both result types carry (the old code returns a dict, the new a dataclass)."""
    if isinstance(res, dict):
        ev = res["run_evals"]
        return {k: ev.get(k) for k in ("ce_loss_without_sae", "ce_loss_with_sae", "explained_variance", "l0")}
    ev = res.run_evals
    return {k: getattr(ev, k) for k in ("ce_loss_without_sae", "ce_loss_with_sae", "explained_variance", "l0")}


def _worker(args: argparse.Namespace) -> None:
    import torch
    from sae_lens import SAE

    import sae_ext
    from sae_ext.data import default_token_dataset
    from sae_ext.evaluate import evaluate_sae
    from sae_ext.models import load_default_model

    src = Path(sae_ext.__file__).resolve().parent.parent
    model = load_default_model()
    ds = default_token_dataset(model.tokenizer, 128, n_tokens=args.tokens, split="eval")
    n_tokens = len(ds) * 128
    n_batches = math.ceil(len(ds) / args.batch_size)
    calls = [0]
    model.embed.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    rows = []
    for sae_dir in json.loads(os.environ["SAE_EXT_BENCH_EVAL_SAES"]):
        row: dict[str, Any] = {"sae": Path(sae_dir).name}
        try:
            sae = SAE.load_from_disk(sae_dir)
            sae.cfg.metadata.hook_name = args.hook
            times = []
            for _ in range(args.repeats):
                calls[0] = 0
                t = time.perf_counter()
                res = evaluate_sae(sae, model, ds, n_tokens=n_tokens, hook_name=args.hook,
                                   batch_size=args.batch_size, progress=False)  # fmt: skip
                times.append(time.perf_counter() - t)
            row.update(seconds=min(times), all_seconds=times, forwards=calls[0],
                       forwards_per_batch=calls[0] / n_batches, **_figures(res))  # fmt: skip
        except Exception as exc:  # a side that cannot load or evaluate an SAE records why
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print(f"[{args.worker}] {row}", flush=True)
    args.worker_out.write_text(json.dumps({
        "side": args.worker, "sae_ext": str(src), "n_tokens": n_tokens, "n_batches": n_batches,
        "torch_threads": torch.get_num_threads(), "rows": rows,
    }, indent=2, default=float))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------


def _export(ref: str, dest: Path) -> Path:
    """``sae_ext`` of git revision ``ref`` under ``dest`` (``git archive``)."""
    archive = dest / "src.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), ref, "sae_ext"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _random_saes(args: argparse.Namespace) -> list[str]:
    """Random-weight inference SAEs at the model width, saved once (same weights for both sides)."""
    import torch
    from sae_lens.registry import get_sae_class

    import sae_ext  # noqa: F401  (registers the plugin architectures)
    from sae_ext.models import default_checkpoint

    d_in = int(json.loads((default_checkpoint() / "config.json").read_text())["hidden_size"])
    out = []
    for arch in args.architectures:
        path = args.work / "saes" / f"{arch}_{d_in}x{args.d_sae}"
        if not (path / "cfg.json").is_file():
            sae_cls, cfg_cls = get_sae_class(arch)
            torch.manual_seed(0)
            sae = sae_cls(cfg_cls(d_in=d_in, d_sae=args.d_sae))
            sae.cfg.metadata.hook_name = args.hook
            sae.cfg.metadata.context_size = 128
            sae.save_model(path)
        out.append(str(path))
    return out


def _side(args: argparse.Namespace, side: str, pythonpath: Path, saes: list[str]) -> dict[str, Any]:
    out = args.work / f"{side}.json"
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "SAE_EXT_BENCH_EVAL_SAES": json.dumps(saes)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--worker-out", str(out),
           "--hook", args.hook, "--tokens", str(args.tokens), "--batch-size", str(args.batch_size),
           "--repeats", str(args.repeats)]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, cwd=args.work)
    result = json.loads(out.read_text())
    if not Path(result["sae_ext"]).resolve().is_relative_to(pythonpath.resolve()):
        raise SystemExit(f"the {side} side imported sae_ext from {result['sae_ext']}, not {pythonpath}")
    return result


def _markdown(before: dict[str, Any], after: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"# Evaluation time per SAE, before ({args.ref}) / after (working tree)",
        "",
        f"`evaluate_sae` with every splice at `{args.hook}`, {after['n_tokens']:,} held-out tokens, "
        f"batch {args.batch_size} rows ({after['n_batches']} batches), min of {args.repeats} run(s), "
        f"{after['torch_threads']} torch threads.",
        "",
        "| SAE | before s | after s | speed-up | forwards/batch before | after | CE with SAE before | after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, a in zip(before["rows"], after["rows"]):
        if "error" in b or "error" in a:
            lines.append(f"| {a['sae']} | {b.get('error', '')} | {a.get('error', '')} | | | | | |")
            continue
        lines.append(
            f"| {a['sae']} | {b['seconds']:.1f} | {a['seconds']:.1f} | {b['seconds'] / a['seconds']:.2f}× | "
            f"{b['forwards_per_batch']:.1f} | {a['forwards_per_batch']:.1f} | "
            f"{b['ce_loss_with_sae']:.4f} | {a['ce_loss_with_sae']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.worker:
        _worker(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    saes = [str(p.resolve()) for p in args.sae_dirs] if args.sae_dirs else _random_saes(args)
    with tempfile.TemporaryDirectory(prefix="sae_ext_ref_") as tmp:
        before = _side(args, "before", _export(args.ref, Path(tmp)), saes)
    after = _side(args, "after", REPO, saes)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "before": before, "after": after}, indent=2)
    )
    md = _markdown(before, after, args)
    (RESULTS / f"{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
