"""The ``sae-ext`` command line: ``demo`` (the main job), ``train`` (SAELens's training CLI with
the plugin architectures registered), ``eval`` (evaluate a saved SAE) and ``dashboard`` (offline
HTML latent dashboards of a saved SAE)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any


def _flag_given(argv: Sequence[str], name: str) -> bool:
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(a.split("=", 1)[0] in flags for a in argv)


def train_config(argv: Sequence[str]) -> Any:
    """SAELens's training-CLI config from ``argv`` with SPEC §8 applied: special tokens excluded,
    the dead-feature window sized to the run and the lr warm-up/decay schedule, unless the flags
    set them."""
    from sae_lens.llm_sae_training_runner import _parse_cfg_args

    import sae_ext  # noqa: F401  (registers the architectures before the parser is built)
    from sae_ext.protocol import apply_protocol

    cfg = _parse_cfg_args(list(argv))
    return apply_protocol(
        cfg,
        exclude_special_tokens=cfg.exclude_special_tokens if _flag_given(argv, "exclude_special_tokens") else True,
        dead_window=cfg.dead_feature_window if _flag_given(argv, "dead_feature_window") else None,
        schedule=not any(_flag_given(argv, f) for f in ("lr_warm_up_steps", "lr_decay_steps")),
    )


def _train(argv: Sequence[str]) -> None:
    """SAELens's own training CLI (``--architecture`` choices from the registry) under SPEC §8."""
    from sae_lens import LanguageModelSAETrainingRunner

    LanguageModelSAETrainingRunner(cfg=train_config(argv)).run()


def build_parser() -> argparse.ArgumentParser:
    from sae_ext.bench import add_bench_arguments
    from sae_ext.dashboard import add_dashboard_arguments
    from sae_ext.demo import add_demo_arguments
    from sae_ext.evaluate import add_eval_arguments

    parser = argparse.ArgumentParser(prog="sae-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_arguments(sub.add_parser("demo", help="the main job on the embedded model and text"))
    add_eval_arguments(sub.add_parser("eval", help="evaluate a saved SAE: run_evals, dark matter, dictionary stats, error nodes"))
    add_dashboard_arguments(sub.add_parser("dashboard", help="offline HTML latent dashboards of a saved SAE"))
    add_bench_arguments(sub.add_parser("bench", help="synthetic benchmarks of benchmarks/ (--quick: minutes)"))
    from sae_ext.sweep import add_sweep_arguments

    add_sweep_arguments(sub.add_parser("sweep", help="sparsity sweeps of several architectures on one capture: L0 curves"))
    sub.add_parser("train", help="SAELens training CLI (all SAELens flags) with sae_ext architectures", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    argv = list(sys.argv[1:] if argv is None else argv)
    from sae_ext.perf import retain_freed_memory

    retain_freed_memory()  # CPU training/eval: reuse freed tensors instead of page-faulting new ones
    if argv and argv[0] == "train":
        _train(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    import sae_ext  # noqa: F401

    if args.command == "demo":
        from sae_ext.demo import run_demo

        run_demo(args)
    elif args.command == "bench":
        from sae_ext.bench import run_bench

        run_bench(args)
    elif args.command == "eval":
        from sae_ext.evaluate import run_eval_command

        return run_eval_command(args)
    elif args.command == "sweep":
        from sae_ext.sweep import run_sweep_command

        return run_sweep_command(args)
    elif args.command == "dashboard":
        from sae_ext.dashboard import run_dashboard_command

        return run_dashboard_command(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
