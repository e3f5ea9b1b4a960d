"""Calling an SAE: activation checks and batching, flat encode/decode, the SAE's hook name and
hook points. Only ``encode``/``decode``/``cfg`` and the SAE's hook points are used, so every
helper works for any SAE registered with SAELens."""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = [
    "check_activations",
    "check_sae_hook_names",
    "encode_decode",
    "flat_input_mode",
    "iter_activation_batches",
    "n_batches_hint",
    "sae_at_hook",
    "sae_hook_name",
    "sae_with_metadata",
]


def check_activations(x: torch.Tensor, d_in: int, what: str = "activations") -> None:
    """Raise ``ValueError`` if ``x`` is not a float tensor ``[..., d_in]`` of finite values."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(
            f"{what} have shape {tuple(x.shape)}: the last dimension must equal "
            f"sae.cfg.d_in = {d_in}"
        )
    if not torch.is_floating_point(x):
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    bad = int((~torch.isfinite(x)).sum().item())
    if bad:
        raise ValueError(
            f"{what} contain {bad} non-finite value(s) (NaN/Inf) out of {x.numel()}; "
            "only finite activations are allowed"
        )


def iter_activation_batches(
    activations: torch.Tensor | Iterable[torch.Tensor], d_in: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Yield ``[n, d_in]`` chunks of at most ``batch_size`` rows from a tensor or an iterable.

    A tensor is validated entirely before the first chunk is yielded; the batches of an
    iterable are validated one by one as they arrive (an iterator cannot be pre-scanned).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(activations, torch.Tensor):
        check_activations(activations, d_in)
        flat = activations.reshape(-1, d_in)
        for start in range(0, flat.shape[0], batch_size):
            yield flat[start : start + batch_size]
        return
    for i, batch in enumerate(activations):
        check_activations(batch, d_in, what=f"activation batch {i}")
        flat = batch.reshape(-1, d_in)
        for start in range(0, flat.shape[0], batch_size):
            yield flat[start : start + batch_size]


def n_batches_hint(activations: Any, batch_size: int) -> int | None:
    """Number of chunks :func:`iter_activation_batches` will yield, when cheaply known."""
    if isinstance(activations, torch.Tensor):
        n = activations.numel() // max(1, activations.shape[-1]) if activations.ndim else 0
        return math.ceil(n / batch_size)
    try:
        return len(activations)
    except TypeError:
        return None


@contextlib.contextmanager
def flat_input_mode(sae: Any) -> Iterator[None]:
    """Feed the SAE flat ``[..., d_in]`` activations even for ``hook_z`` SAEs (as ``run_evals``)."""
    reshaping = bool(getattr(sae, "hook_z_reshaping_mode", False))
    if reshaping:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield
    finally:
        if reshaping:
            sae.turn_on_forward_pass_hook_z_reshaping()


@torch.no_grad()
def encode_decode(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(feature_acts, SAE(x))`` for flat activations ``x``, using only ``encode``/``decode``.

    ``x`` is moved to the SAE's device and dtype; the reconstruction is returned on ``x``'s
    device in ``x``'s dtype, the latent activations (dense) on the SAE's device.
    """
    device = getattr(sae, "device", x.device)
    dtype = getattr(sae, "dtype", x.dtype)
    with flat_input_mode(sae):
        feats = sae.encode(x.to(device=device, dtype=dtype))
        out = sae.decode(feats)
    if feats.is_sparse:
        feats = feats.to_dense()
    return feats, out.to(device=x.device, dtype=x.dtype)


def sae_hook_name(sae: Any, hook_name: str | None) -> str:
    """``hook_name`` if given, else the SAE's own ``cfg.metadata.hook_name`` (``ValueError`` if
    neither is set)."""
    name = hook_name or sae.cfg.metadata.hook_name
    if not name:
        raise ValueError(
            "the SAE has no hook name (sae.cfg.metadata.hook_name is empty); pass hook_name="
        )
    return str(name)


def sae_with_metadata(sae: Any, **metadata: Any) -> Any:
    """``sae`` itself if its ``cfg.metadata`` already holds these values, else a shallow view of
    it (same parameters and hook points) whose config metadata holds them: for SAELens functions
    that read the hook name (or ``prepend_bos``) from the config, without mutating the caller's
    SAE."""
    if all(getattr(sae.cfg.metadata, k) == v for k, v in metadata.items()):
        return sae
    from sae_lens.saes.sae import SAEMetadata

    view = copy.copy(sae)
    cfg = copy.copy(sae.cfg)
    cfg.metadata = SAEMetadata(**{**sae.cfg.metadata.to_dict(), **metadata})
    view.cfg = cfg
    return view


def sae_at_hook(sae: Any, hook: str) -> Any:
    """:func:`sae_with_metadata` naming the canonical ``hook``."""
    return sae_with_metadata(sae, hook_name=hook)


def check_sae_hook_names(sae: Any, names: Iterable[str]) -> None:
    """``ValueError`` naming the closest hook points if any of ``names`` is not one of the SAE's."""
    valid = sorted(sae.hook_dict)
    for n in names:
        if n not in sae.hook_dict:
            close = difflib.get_close_matches(n, valid, n=5, cutoff=0.4)
            raise ValueError(
                f"the SAE ({type(sae).__name__}) has no hook point {n!r}; "
                f"closest: {', '.join(close) or '-'}; all: {', '.join(valid)}"
            )
