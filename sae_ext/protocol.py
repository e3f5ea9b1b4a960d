"""SPEC §8, the real-activation protocol, as settings every training path applies.

- Special tokens (the tokenizer's special ids: BOS, EOS, PAD, chat markers) never reach a training
  batch, the normalisation estimate or a data-driven init: SAELens's own
  ``exclude_special_tokens`` switch does the filtering, on live activations and on cached ones
  (the capture keeps each position's token id).
- The dead-feature window is sized to the run (≤ 10 % of its steps) unless the user set it, so
  AuxK, SASA's group AuxK and SA-GSAE's dead-latent terms act in short runs too.
- The learning rate follows SAELens's own schedule fields: warm-up over the first 1 % of the steps
  and linear decay to ``lr_end`` (lr/10) over the last 20 %, unless the user set a schedule. Measured
  (``benchmarks/results/convergence.md``): at SmolLM2 ``hook_mlp_out`` a TopK run of 0.4 M tokens
  with the decay beats a constant-lr run of 3.1 M.
- A run is converged when held-out R² moved by at most ``CONVERGENCE_TOLERANCE`` between a run of
  half its budget (its own schedule) and the run itself.

This module sits below ``capture``, ``demo``, ``cli`` and the benchmarks; it imports only
``sae_ext.model_io`` (where the special ids of a model come from).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from sae_ext.model_io import special_token_ids

logger = logging.getLogger(__name__)

#: Share of a run's steps that the dead-feature window may span (SPEC §8: ≤ 10 %).
DEAD_WINDOW_FRACTION = 0.1
#: SAELens lr schedule of a protocol run, as fractions of its steps: warm-up, then linear decay to lr/10.
LR_WARM_UP_FRACTION = 0.01
LR_DECAY_FRACTION = 0.2
#: Held-out R² change between half and full budget below which a run counts as converged.
CONVERGENCE_TOLERANCE = 0.01
#: Default training tokens by the hook's kind (its name's last part), at batch 1024 and d_sae 1152,
#: from the measured convergence table (``benchmarks/results/convergence.md``): residual streams
#: converge by about 1 M tokens (TopK, JumpReLU; BatchTopK +0.011 at `resid_post`), so 2 M leaves a margin; ``attn_out`` and
#: ``mlp_out`` do not converge by 2 M (TopK gains per doubling 0.033 → 0.027 → 0.018 and
#: 0.035 → 0.024 → 0.019; at `mlp_out` +0.011 from 4 to 8 M on an H200), so they get 8 M. A hook of
#: another kind gets the slowest of them.
DEFAULT_TRAINING_TOKENS = {
    "hook_resid_pre": 2_000_000,
    "hook_resid_mid": 2_000_000,
    "hook_resid_post": 2_000_000,
    "hook_attn_out": 8_000_000,
    "hook_mlp_out": 8_000_000,
}

#: A non-special token is *massive* (an attention sink: the first token after BOS in some rows at
#: SmolLM2's residual streams, ‖x‖ ≈ 9,000–25,000 against a median ≈ 165) when its norm exceeds this
#: many times the median norm. Not part of the shared SPEC §8 (a proposal, ``docs/SPEC.md``); reports
#: give the statistics these tokens dominate both ways (``benchmarks/RESULTS.md`` §0d).
MASSIVE_NORM_FACTOR = 10.0


def resolve_special_tokens(model: Any, exclude: bool | list[int]) -> list[int] | bool:
    """What to hand SAELens's ``exclude_special_tokens``: ``True`` becomes the model tokenizer's
    special ids, an explicit list is checked, ``False`` turns the protocol off.

    A model without a tokenizer (the tests' tiny ``HookedTransformer``) has no special ids to find:
    ``True`` is then an error, so that nothing silently trains on BOS.
    """
    if exclude is False:
        return False
    if exclude is True:
        ids = list(special_token_ids(model))
        if not ids:
            raise ValueError(
                "exclude_special_tokens=True needs a model with a tokenizer that has special tokens; "
                "pass the ids to exclude as a list of ints, or False to train on every position"
            )
        return ids
    if not isinstance(exclude, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in exclude
    ):
        raise ValueError(f"exclude_special_tokens must be True, False or a list of token ids >= 0, got {exclude!r}")
    return sorted(set(exclude))


def total_steps(training_tokens: int, batch_size_tokens: int) -> int:
    """Optimiser steps of a run of ``training_tokens`` in batches of ``batch_size_tokens``."""
    for name, value in (("training_tokens", training_tokens), ("batch_size_tokens", batch_size_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return math.ceil(training_tokens / batch_size_tokens)


def dead_feature_window(training_tokens: int, batch_size_tokens: int, requested: int | None = None) -> int:
    """The dead-feature window of a run: ``requested`` if given, else 10 % of its steps (at least 1).

    SAELens's default of 1000 steps is longer than a whole CPU-budget run, so without this the
    dead-latent machinery (AuxK and friends) never acts.
    """
    steps = total_steps(training_tokens, batch_size_tokens)
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"dead_feature_window must be a positive int, got {requested!r}")
        return requested
    return max(1, int(steps * DEAD_WINDOW_FRACTION))


def lr_schedule(training_tokens: int, batch_size_tokens: int) -> dict[str, int]:
    """SAELens's ``lr_warm_up_steps`` and ``lr_decay_steps`` for a protocol run of ``training_tokens``."""
    steps = total_steps(training_tokens, batch_size_tokens)
    return {"lr_warm_up_steps": int(steps * LR_WARM_UP_FRACTION), "lr_decay_steps": int(steps * LR_DECAY_FRACTION)}


def apply_protocol(
    cfg: Any,
    model: Any | None = None,
    *,
    exclude_special_tokens: bool | list[int] = True,
    dead_window: int | None = None,
    schedule: bool = True,
) -> Any:
    """Apply SPEC §8 to a ``LanguageModelSAERunnerConfig`` in place and return it.

    ``exclude_special_tokens`` (default: the model tokenizer's special ids) goes to SAELens's own
    switch (with no ``model`` at hand, ``True`` is left for SAELens to resolve when it loads one);
    the dead-feature window is ``dead_window`` if the user chose one, else 10 % of the run's steps,
    and the feature-sampling window is widened to at least it. With ``schedule``, a config without
    an lr schedule (SAELens's default: no warm-up, no decay) gets :func:`lr_schedule`; one the user
    set is kept. All of it is logged.
    """
    if model is None and exclude_special_tokens is True:
        cfg.exclude_special_tokens = True
    else:
        cfg.exclude_special_tokens = resolve_special_tokens(model, exclude_special_tokens)
    window = dead_feature_window(cfg.training_tokens, cfg.train_batch_size_tokens, dead_window)
    cfg.dead_feature_window = window
    cfg.feature_sampling_window = max(cfg.feature_sampling_window, window)
    steps = total_steps(cfg.training_tokens, cfg.train_batch_size_tokens)
    if schedule and not cfg.lr_warm_up_steps and not cfg.lr_decay_steps:
        for name, value in lr_schedule(cfg.training_tokens, cfg.train_batch_size_tokens).items():
            setattr(cfg, name, value)
    logger.info(
        "SPEC §8: dead-feature window %d of %d steps; lr warm-up %d and decay %d steps; special tokens excluded: %s",
        window, steps, cfg.lr_warm_up_steps, cfg.lr_decay_steps, cfg.exclude_special_tokens,
    )
    return cfg


def default_training_tokens(hook: str) -> int:
    """SPEC §8's default budget at ``hook`` (:data:`DEFAULT_TRAINING_TOKENS` by the name's last part)."""
    if not isinstance(hook, str) or not hook:
        raise ValueError(f"hook must be a hook name such as 'blocks.15.hook_mlp_out', got {hook!r}")
    return DEFAULT_TRAINING_TOKENS.get(hook.rsplit(".", 1)[-1], max(DEFAULT_TRAINING_TOKENS.values()))


def is_converged(r2_half: float, r2_full: float, tolerance: float = CONVERGENCE_TOLERANCE) -> bool:
    """SPEC §8: converged when held-out R² moved by at most ``tolerance`` from half to full budget."""
    if not (math.isfinite(r2_half) and math.isfinite(r2_full)):
        raise ValueError(f"R² values must be finite, got {r2_half!r} and {r2_full!r}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    return abs(r2_full - r2_half) <= tolerance


def massive_token_mask(x: Any, factor: float = MASSIVE_NORM_FACTOR) -> Any:
    """Bool ``[n]``: rows of the activations ``x`` ``[n, d]`` whose norm exceeds ``factor`` × the median norm."""
    if getattr(x, "ndim", None) != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be activations [n, d] with n >= 1, got shape {tuple(getattr(x, 'shape', ()))}")
    if not factor > 1 or factor == float("inf"):
        raise ValueError(f"factor must be a finite number > 1 (a multiple of the median norm), got {factor!r}")
    if not bool(x.isfinite().all()):
        raise ValueError("x holds NaN or Inf values; the median norm needs finite activations")
    norms = x.norm(dim=-1)
    return norms > factor * norms.median()
