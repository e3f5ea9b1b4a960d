"""One-call evaluation of an SAE on a model: SAELens ``run_evals`` metrics, dark matter,
dictionary statistics, error-node ablation and whatever the architecture adds (the scaffold
ablation against top-r PCA removal, group ranks: :mod:`sae_ext.evaluation_spec`); writes
``eval.json``, ``eval.md`` and ``firing_rate_hist.png`` (:mod:`sae_ext.eval_report`).

Per batch of token rows the model runs at most 12 times for a scaffolded SAE with every splice:
``run_evals``'s activation pass and ours (both stop at the hook), then one
:meth:`~sae_ext.splicer.Splicer.measure` call that runs the clean model, the plain splice, the
zero ablation and each further intervention once. Special-token positions are never spliced nor
counted (SPEC §8).

The CLI (``sae-ext eval SAE_DIR [--tokens N] [--hook NAME] [--out DIR]``) is wired by
``sae_ext.cli`` through :func:`add_eval_arguments` and :func:`run_eval_command`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_ext.eval_report import fmt, write_report
from sae_ext.eval_result import ComponentAblation, EvaluationResult, SAEInfo, json_safe
from sae_ext.evaluation_spec import evaluation_spec
from sae_ext.interventions import (
    ERROR_TERM,
    SAE,
    ZERO_ABLATION,
    DarkMatterCE,
    DirectionRemoval,
    ErrorNodeAblation,
    HookAblation,
    error_ablation,
    hook_ablation,
    linear_error_splice,
    nonlinear_error_splice,
    subspace_basis,
    subspace_removal,
)
from sae_ext.metrics.dark_matter import DarkMatterAccumulator
from sae_ext.metrics.dictionary import DictionaryStatsAccumulator
from sae_ext.metrics.pca import PCAAccumulator, principal_angles_degrees
from sae_ext.model_io import SpecialTokens, as_token_tensor, special_token_mask
from sae_ext.sae_io import check_sae_hook_names, encode_decode
from sae_ext.saelens_evals import run_evals_validated
from sae_ext.splicer import Intervention, Splicer

__all__ = ["DEFAULT_EVAL_TOKENS", "add_eval_arguments", "evaluate_sae", "run_eval_command"]

DEFAULT_EVAL_TOKENS = 32_768


def _check_out_dir(out_dir: str | Path | None) -> Path | None:
    if out_dir is None:
        return None
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out_dir {str(path)!r} exists and is not a directory")
    return path


@torch.no_grad()
def evaluate_sae(
    sae: Any,
    model: Any,
    tokens_dataset: Any,
    *,
    n_tokens: int,
    hook_name: str | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 8,
    test_fraction: float = 0.5,
    fit_intercept: bool = False,
    seed: int = 0,
    pca_rank: int | None = None,
    splices: bool = True,
    special_tokens: SpecialTokens = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate ``sae`` spliced into ``model`` on the first ``n_tokens`` tokens (whole rows,
    rounded up) of ``tokens_dataset`` (a tokenized ``Dataset``, a tensor ``[rows, context]`` or
    lists).

    Computes: SAELens ``run_evals`` (CE/KL loss recovered, explained variance, L0, …), dark
    matter (error/norm R², FVU, nonlinear FVU) and its CE splices, dictionary statistics, zero
    and mean error-node ablation, and what the SAE's
    :class:`~sae_ext.evaluation_spec.EvaluationSpec` adds: zeroing its ``ablation_hook`` (the
    scaffold) vs removing the top-r PCA directions (``r = ablation_pca_rank`` or ``pca_rank``;
    of the centred non-special activations, with their mean kept: ``x − ((x − μ) Q) Qᵀ``, SPEC
    §2) and the principal angles between the component's declared range and those directions,
    group statistics. Activations are streamed (one pass, ``O(d_in²)`` memory). The dark-matter
    CE splices use ``W*`` on all ``n_tokens`` tokens (about half of them were its train split);
    the R²/FVU scores are test-split only. Positions holding a special token (``special_tokens``:
    by default the model tokenizer's; see :func:`sae_ext.model_io.special_token_ids`) are never
    spliced and never enter a statistic. With ``out_dir`` also writes ``eval.json``, ``eval.md``
    and ``firing_rate_hist.png`` there. Everything is validated before any work.
    ``splices=False`` skips the extra interventions (dark-matter CE splices, error-node and
    scaffold ablations) and keeps ``run_evals``, dark-matter statistics and dictionary stats.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"n_tokens must be an integer >= 2, got {n_tokens!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    if pca_rank is not None and not 1 <= pca_rank <= sae.cfg.d_in:
        raise ValueError(f"pca_rank must lie in [1, d_in = {sae.cfg.d_in}], got {pca_rank}")
    out_path = _check_out_dir(out_dir)
    toks = as_token_tensor(tokens_dataset, n_tokens=n_tokens)
    splicer = Splicer(
        model,
        sae,
        toks,
        hook_name=hook_name,
        special_tokens=special_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    spec = evaluation_spec(sae)
    if spec.ablation_hook is not None:
        check_sae_hook_names(sae, [spec.ablation_hook])
    r_pca = pca_rank or spec.ablation_pca_rank
    compare_pca = splices and spec.ablation_hook is not None and r_pca is not None

    bar = tqdm(total=3, desc="evaluate_sae", disable=not progress)
    bar.set_postfix_str("run_evals")
    run_evals = run_evals_validated(
        model,
        sae,
        splicer.tokens,
        splicer.hook,
        splicer.special_ids,
        batch_size_prompts=batch_size,
        loss=False,
        progress=progress,
    )
    bar.update()

    bar.set_postfix_str("activations")
    dm_acc = DarkMatterAccumulator(int(sae.cfg.d_in), test_fraction=test_fraction, seed=seed)
    dict_acc = DictionaryStatsAccumulator(int(sae.cfg.d_sae), group_rank=spec.group_rank)
    pca_acc = PCAAccumulator() if compare_pca else None
    for x in splicer.activations():
        feats, out = encode_decode(sae, x)
        dm_acc.update(x, out)
        dict_acc.update(feats)
        if pca_acc is not None:
            pca_acc.update(x)
    dm = dm_acc.result(fit_intercept=fit_intercept)
    stats = dict_acc.result(group_blocks=spec.group_blocks)
    bar.update()

    bar.set_postfix_str("splices")
    ivs: list[Intervention] = [SAE, ZERO_ABLATION]
    pca = None
    if splices:
        ivs += [
            linear_error_splice(dm.W),
            nonlinear_error_splice(dm.W),
            ERROR_TERM,
            error_ablation("zero"),
            error_ablation("mean", dm_acc.mean_error()),
        ]
        if spec.ablation_hook is not None:
            ivs.append(hook_ablation(spec.ablation_hook))
        if pca_acc is not None and r_pca is not None:
            pca = pca_acc.result(r_pca)
            ivs.append(subspace_removal(*subspace_basis(pca.basis, pca.mean, splicer.width)))
    meters = splicer.measure(ivs, desc="evaluate splices")
    bar.update()
    bar.close()

    clean, plain, zero = meters["clean"], meters["sae"], meters["zero_ablation"]
    run_evals = run_evals.with_loss_recovered(
        ce_clean=clean.ce,
        ce_sae=plain.ce,
        ce_zero=zero.ce,
        kl_sae=plain.kl("clean"),
        kl_zero=zero.kl("clean"),
    )
    run_evals.total_tokens_eval_reconstruction = int(splicer.tokens.numel())
    mask = special_token_mask(splicer.tokens, splicer.special_ids)
    result = EvaluationResult(
        sae=SAEInfo(
            architecture=sae.cfg.architecture(),
            d_in=int(sae.cfg.d_in),
            d_sae=int(sae.cfg.d_sae),
            hook_name=splicer.hook,
            requested_hook_name=hook_name or sae.cfg.metadata.hook_name,
            model=type(model).__name__,
        ),
        n_tokens=int(splicer.tokens.numel()),
        n_sequences=int(splicer.tokens.shape[0]),
        context_size=int(splicer.tokens.shape[1]),
        n_special_positions=int(mask.sum().item()) if mask is not None else 0,
        run_evals=run_evals,
        dark_matter=dm,
        dictionary=stats,
    )
    if splices:
        result.dark_matter_ce = DarkMatterCE.from_meters(meters)
        result.error_node_ablation = {
            mode: ErrorNodeAblation.from_meters(mode, meters) for mode in ("zero", "mean")
        }
    if splices and spec.ablation_hook is not None:
        abl = HookAblation.from_meters(spec.ablation_hook, True, meters)
        rem = (
            DirectionRemoval.from_meters(splicer.hook, pca.basis.shape[1], meters)
            if pca is not None
            else None
        )
        result.scaffold = ComponentAblation(
            ablation=abl,
            pca_removal=rem,
            pca_rank=r_pca,
            pca_explained_variance=(
                float(pca.explained_variance_ratio.sum().item()) if pca is not None else None
            ),
            increase_ratio_vs_pca=(
                abl.ce_increase / rem.ce_increase if rem is not None and rem.ce_increase else None
            ),
            principal_angles_deg=(
                principal_angles_degrees(spec.ablation_subspace.to(pca.basis), pca.basis).tolist()
                if spec.ablation_subspace is not None and pca is not None
                else None
            ),
        )
    if out_path is not None:
        write_report(result, out_path)
    return result


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``sae-ext eval``."""
    parser.add_argument("sae_dir", type=Path, help="folder of a saved SAE (cfg.json + weights)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_EVAL_TOKENS,
        help=f"held-out tokens to evaluate on (default {DEFAULT_EVAL_TOKENS})",
    )
    parser.add_argument(
        "--hook", default=None, help="hook name (default: the SAE's cfg.metadata.hook_name)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: SAE_DIR/eval)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the dark-matter train/test split"
    )
    parser.add_argument(
        "--probes", action="store_true",
        help="also first-letter absorption, k-sparse probing on the Python-docs sections and the "
             "scaffold-vs-latents topic test (sae_ext.metrics.probing; writes probes.json)",
    )
    parser.add_argument("--probe-per-class", type=int, default=None,
                        help="paragraphs per section for --probes (default: all)")
    parser.add_argument("--absorption-words", type=int, default=None,
                        help="spelling words for --probes' absorption (default: every eligible word)")
    return parser


def run_eval_command(args: argparse.Namespace) -> int:
    """``sae-ext eval``: load the SAE and the default model/text, evaluate, write the report."""
    from sae_ext.metrics.absorption import min_absorption_words

    for name, least in (("probe_per_class", 1), ("absorption_words", min_absorption_words())):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    sae_dir = Path(args.sae_dir)
    if not (sae_dir / "cfg.json").is_file():
        raise ValueError(f"{str(sae_dir)!r} is not a saved SAE folder (no cfg.json)")
    if args.tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {args.tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    out_dir = _check_out_dir(args.out if args.out is not None else sae_dir / "eval")
    assert out_dir is not None

    from sae_lens import SAE as SAELensSAE

    from sae_ext.data import default_token_dataset
    from sae_ext.models import load_default_model

    sae = SAELensSAE.load_from_disk(str(sae_dir))
    model = load_default_model()
    context_size = int(sae.cfg.metadata.context_size or 128)
    n_request = math.ceil(args.tokens / context_size) * context_size
    dataset = default_token_dataset(model.tokenizer, context_size, n_tokens=n_request, split="eval")
    result = evaluate_sae(
        sae,
        model,
        dataset,
        n_tokens=args.tokens,
        hook_name=args.hook,
        out_dir=out_dir,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if getattr(args, "probes", False):
        from sae_ext.metrics.probing import probe_metrics

        hook = args.hook or sae.cfg.metadata.hook_name
        probes = probe_metrics(model, sae, hook, per_class=args.probe_per_class,
                               absorption_words=args.absorption_words, batch_size=args.batch_size, seed=args.seed,
                               progress=True)
        (out_dir / "probes.json").write_text(json.dumps(json_safe(probes), indent=2))
        print(f"wrote {out_dir / 'probes.json'}")
    ev, dm = result.run_evals, result.dark_matter
    print(
        f"wrote {out_dir / 'eval.md'}: CE loss recovered {fmt(ev.ce_loss_score)}, "
        f"explained variance {fmt(ev.explained_variance)}, L0 {fmt(ev.l0)}, "
        f"error R² {fmt(dm.error_r2)}, norm R² {fmt(dm.norm_r2)}"
    )
    return 0
