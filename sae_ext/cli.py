"""The ``sae-ext`` command line: ``demo`` (the main job), ``train`` (SAELens's training CLI with
the plugin architectures registered), ``eval`` (evaluate a saved SAE) and ``dashboard`` (offline
HTML latent dashboards of a saved SAE)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _train(argv: Sequence[str]) -> None:
    """SAELens's own training CLI; ``--architecture`` choices come from the registry."""
    from sae_lens.llm_sae_training_runner import _run_cli

    import sae_ext  # noqa: F401  (registers the architectures before the parser is built)

    _run_cli(list(argv))


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
    elif args.command == "dashboard":
        from sae_ext.dashboard import run_dashboard_command

        return run_dashboard_command(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
