"""Input and config checks shared by the plugin SAEs: one clear error, before any work.

Activation checks (called by every plugin SAE):

- **Width.** ``encode`` (through ``process_sae_in``) and ``training_forward_pass`` raise a
  ``ValueError`` naming the expected ``d_in`` and the shape received, instead of a matmul
  shape error from deep inside the encoder. Always on: it is one integer comparison.
- **NaN / Inf in training.** ``training_forward_pass`` raises a ``ValueError`` naming the
  training step (``step_input.n_training_steps``) and how many values are NaN / Inf, before
  any state changes (no scaffold PCA initialisation, no threshold reset, no decoder fold, no
  optimizer step). By default it runs on every step whose batch is on the CPU (one reduction,
  small beside the step) and is opt-in on accelerators (CUDA, MPS, …): there, deciding whether
  to raise needs the reduction's result on the host, i.e. a host–device synchronisation every
  step, which drains the queue of kernels the host has launched ahead and idles the GPU while
  Python prepares the next ones; under ``torch.compile`` it is data-dependent control flow, a
  graph break in every training step. ``benchmarks/gpu_check.py`` measures both (``nan_check``
  step-time overhead, graph breaks). Choose for the process or for a block::

      from sae_ext.validation import check_finite_training_inputs

      check_finite_training_inputs(True)      # every step, on every device
      check_finite_training_inputs(False)     # never
      check_finite_training_inputs(None)      # the default: CPU batches only
      with check_finite_training_inputs():    # on inside the block, then the previous setting
          trainer.fit()

  The automatic setting also skips the check while ``torch.compile`` traces the step.
- **NaN / Inf at inference.** Opt-in, so that the inference hot path (splices, evals) does not
  pay a device synchronisation per call. Turn it on for the whole process or for a block::

      from sae_ext.validation import check_finite_inputs

      check_finite_inputs(True)          # from now on
      with check_finite_inputs():        # only inside the block, then the previous setting
          sae.encode(x)

  The switch is process-wide (not per thread) and off by default.

Config checks used by the architecture configs live here too (``check_topk_k``,
``check_unit_interval``, ``check_matryoshka_widths``).
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

import torch

__all__ = [
    "check_finite_inputs",
    "check_finite_training_inputs",
    "check_input_width",
    "check_matryoshka_widths",
    "check_sae_input",
    "check_topk_k",
    "check_training_input",
    "check_unit_interval",
    "finite_input_checks_enabled",
    "finite_training_checks_enabled",
    "input_width",
]


class _Switch:
    """Holder of the process-wide finite-check flags."""

    enabled: bool = False  # inference
    training: bool | None = None  # training; None: automatic (CPU batches only)


class _SwitchSetting:
    """Sets one flag of :class:`_Switch` on construction; as a context manager restores it on exit
    (a class used like a function, as ``torch.set_grad_enabled``)."""

    _flag: str

    def __init__(self, value: bool | None) -> None:
        self.previous = getattr(_Switch, self._flag)
        setattr(_Switch, self._flag, value)

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        setattr(_Switch, self._flag, self.previous)


class check_finite_inputs(_SwitchSetting):
    """Turn the inference NaN/Inf check of plugin SAE inputs on (default) or off.

    A class used like a function (as ``torch.set_grad_enabled``): the setting takes effect
    immediately, so ``check_finite_inputs(True)`` is a plain call; used as a context manager
    it restores the previous setting on exit.
    """

    _flag = "enabled"

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool; got {enabled!r}")
        super().__init__(enabled)


def finite_input_checks_enabled() -> bool:
    """Whether plugin SAEs check their inference inputs for NaN/Inf (see :class:`check_finite_inputs`)."""
    return _Switch.enabled


class check_finite_training_inputs(_SwitchSetting):
    """Set the training NaN/Inf check: True (every step, any device), False (never) or None
    (automatic, the default: batches on the CPU only; see the module docstring for why).

    Used like :class:`check_finite_inputs`: a plain call takes effect immediately; as a context
    manager it restores the previous setting on exit.
    """

    _flag = "training"

    def __init__(self, enabled: bool | None = True) -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True, False or None (automatic); got {enabled!r}")
        super().__init__(enabled)


def finite_training_checks_enabled(device: torch.device | str) -> bool:
    """Whether a training batch on ``device`` is checked for NaN/Inf (see
    :class:`check_finite_training_inputs`); the automatic setting also skips it while
    ``torch.compile`` traces."""
    if _Switch.training is not None:
        return _Switch.training
    return torch.device(device).type == "cpu" and not torch.compiler.is_compiling()


# --------------------------------------------------------------------------- activations


def _arch(sae: Any) -> str:
    try:
        return str(sae.cfg.architecture())
    except Exception:  # only used to word a message
        return type(sae).__name__


def input_width(sae: Any, x: torch.Tensor) -> int:
    """The width ``x`` has once SAELens's input reshaping ran (``hook_z``: ``n_heads·d_head``)."""
    if x.dim() == 0:
        return 0
    if getattr(sae, "hook_z_reshaping_mode", False) and x.dim() >= 2:
        return int(x.shape[-2] * x.shape[-1])
    return int(x.shape[-1])


def check_input_width(sae: Any, x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the activations ``x`` have the SAE's input width ``cfg.d_in``."""
    d_in = int(sae.cfg.d_in)
    if input_width(sae, x) == d_in:
        return
    if getattr(sae, "hook_z_reshaping_mode", False):
        expected = f"[..., n_heads, d_head] with n_heads·d_head = d_in = {d_in}"
    else:
        expected = f"[..., d_in] with d_in = {d_in}"
    raise ValueError(
        f"wrong activation width for this {_arch(sae)} SAE: expected {expected}; "
        f"got shape {tuple(x.shape)}. Is the SAE meant for another hook point or model?"
    )


def _non_finite_summary(x: torch.Tensor) -> str | None:
    """``None`` when every value of ``x`` is finite, else ``"n of N values are NaN or Inf (…)"``."""
    if not x.is_floating_point() and not x.is_complex():
        return None
    if bool(torch.isfinite(x).all()):
        return None
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    return (
        f"{n_nan + n_inf} of {x.numel()} values are NaN or Inf "
        f"({n_nan} NaN, {n_inf} Inf; shape {tuple(x.shape)}, dtype {x.dtype})"
    )


def check_sae_input(sae: Any, x: torch.Tensor) -> None:
    """The checks every plugin SAE runs on the raw input of ``encode``.

    Width always; NaN/Inf only while :func:`finite_input_checks_enabled`.
    """
    check_input_width(sae, x)
    if _Switch.enabled:
        summary = _non_finite_summary(x)
        if summary is not None:
            raise ValueError(
                f"non-finite input to this {_arch(sae)} SAE: {summary} "
                "(checked because sae_ext.validation.check_finite_inputs is on)"
            )


def check_training_input(sae: Any, step_input: Any) -> None:
    """The checks every plugin SAE runs first in ``training_forward_pass``: width (always) and
    NaN/Inf (while :func:`finite_training_checks_enabled` for the batch's device).

    Raises before the step changes anything, so the weights and the optimizer state are those
    of the last good step.
    """
    x = step_input.sae_in
    check_input_width(sae, x)
    if not finite_training_checks_enabled(x.device):
        return
    summary = _non_finite_summary(x)
    if summary is not None:
        raise ValueError(
            f"non-finite training activations at training step {step_input.n_training_steps} "
            f"({_arch(sae)} SAE): {summary}. The step was not taken and no weights changed; "
            "check the activation source (e.g. a float16 model overflowing) or the "
            "activation normalisation"
        )


# --------------------------------------------------------------------------- configs


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_topk_k(k: Any, d_sae: int, *, name: str = "k") -> None:
    """``k`` (average active latents per token, BatchTopK) must be a number in ``(0, d_sae]``."""
    if not _is_real(k) or not 0 < k <= d_sae:
        raise ValueError(
            f"{name} must be a number with 0 < {name} <= d_sae = {d_sae} "
            f"(active latents per token); got {k!r}"
        )


def check_unit_interval(name: str, value: Any) -> None:
    """``value`` must be a finite number in ``[0, 1]`` (e.g. an EMA rate)."""
    if not _is_real(value) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")


def check_matryoshka_widths(widths: Any, d_sae: int) -> None:
    """Matryoshka level widths: positive integers, strictly increasing, the last equal to ``d_sae``.

    SAELens itself appends ``d_sae`` with a warning and reports other problems only at SAE
    construction without naming the widths; this check runs at config time and says what is
    wrong and what is allowed.
    """
    allowed = (
        f"a non-empty list of positive integers, strictly increasing, ending at d_sae = {d_sae} "
        f"(e.g. {[w for w in (d_sae // 16, d_sae // 4) if w > 0] + [d_sae]})"
    )
    if not isinstance(widths, (list, tuple)) or not widths:
        raise ValueError(f"matryoshka_widths must be {allowed}; got {widths!r}")
    bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or w < 1]
    if bad:
        raise ValueError(
            f"matryoshka_widths must be {allowed}; got {list(widths)} "
            f"(not positive integers: {bad})"
        )
    pairs = [(a, b) for a, b in zip(widths[:-1], widths[1:]) if a >= b]
    if pairs:
        raise ValueError(
            f"matryoshka_widths must be {allowed}; got {list(widths)} "
            f"(not increasing at {pairs[0][0]} -> {pairs[0][1]})"
        )
    if widths[-1] != d_sae:
        if widths[-1] < d_sae:
            hint = f"append d_sae: {[*widths, d_sae]}"
        else:
            hint = f"widths larger than d_sae: {[w for w in widths if w > d_sae]}"
        raise ValueError(f"matryoshka_widths must be {allowed}; got {list(widths)} ({hint})")
