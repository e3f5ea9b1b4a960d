"""TransformerLens model I/O: hook names, token rows, activation views and widths, special
tokens, and streaming the activations at one hook (SPEC §5, §8).

Hook names: a TransformerBridge accepts HookedTransformer-style aliases
(``blocks.0.hook_resid_post`` -> ``blocks.0.hook_out``), but ``run_with_hooks`` silently ignores
names it does not know. :func:`resolve_hook_name` therefore validates every name (listing the
closest valid ones) and maps aliases to the bridge's canonical hook.

Special tokens (SPEC §8): the positions holding one of the tokenizer's special ids (BOS, EOS,
PAD, SEP, decoder start: SAELens's ``get_special_token_ids``) never enter a statistic and are
never spliced. BOS residuals are attention sinks whose norm can be 100× the others'.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = [
    "SpecialTokens",
    "activation_view",
    "activation_width",
    "as_token_tensor",
    "check_tokens",
    "input_device",
    "iter_activations",
    "resolve_hook_name",
    "special_token_ids",
    "special_token_mask",
    "stream_activations",
    "token_batches",
    "valid_hook_names",
]

#: ``None`` (the model tokenizer's special ids; none without a tokenizer), a tokenizer, or an
#: explicit iterable of token ids (``()`` keeps every position).
SpecialTokens = Any


# --------------------------------------------------------------------------------------------
# hook names
# --------------------------------------------------------------------------------------------


def _alias_map(model: Any) -> dict[str, str]:
    """Alias -> canonical hook name for a TransformerBridge (empty for HookedTransformer)."""
    hook_dict = model.hook_dict
    raw: dict[str, Any] = dict(getattr(model, "hook_aliases", None) or {})
    collect = getattr(model, "_collect_hook_aliases_from_registry", None)
    if callable(collect):
        raw.update(collect())
    out: dict[str, str] = {}
    for alias, target in raw.items():
        targets = target if isinstance(target, list) else [target]
        for t in targets:
            if isinstance(t, str) and t in hook_dict and t != alias:
                out[alias] = t
                break
    return out


def valid_hook_names(model: Any) -> list[str]:
    """Every hook name the model accepts: its hook points plus (bridges) their aliases."""
    return sorted(set(model.hook_dict) | set(_alias_map(model)))


def resolve_hook_name(model: Any, name: str) -> str:
    """The canonical hook-point name for ``name`` on ``model``; ``ValueError`` if unknown.

    On a bridge an alias resolves to the hook point it stands for; the error message lists the
    closest valid names (difflib), since TransformerLens itself ignores unknown names silently.
    A hook with an SAE already attached (``model.add_sae``) is refused: the splices here attach
    the SAE themselves.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"hook name must be a non-empty string, got {name!r}")
    attached = set(getattr(model, "_acts_to_saes", None) or {})
    canonical = _alias_map(model).get(name, name)
    if attached & {name, canonical}:
        raise ValueError(
            f"an SAE is already attached to the model at {name!r}; call model.reset_saes() "
            "first (these functions splice the SAE themselves)"
        )
    if canonical in model.hook_dict:
        return canonical
    valid = valid_hook_names(model)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f"closest valid names: {', '.join(close)}" if close else f"e.g. {', '.join(valid[:5])}"
    raise ValueError(
        f"unknown hook name {name!r} for {type(model).__name__} ({len(valid)} valid names); {hint}"
    )


# --------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------


def as_token_tensor(data: Any, *, n_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[n_rows, context]`` (int64) from a tensor, nested lists or a tokenized
    ``datasets.Dataset`` (``input_ids`` or ``tokens`` column). With ``n_tokens``, the fewest
    leading rows holding at least that many tokens (``ValueError`` if there are fewer)."""
    if isinstance(data, torch.Tensor):
        toks = data
    elif hasattr(data, "column_names"):
        cols = [c for c in ("input_ids", "tokens") if c in data.column_names]
        if not cols:
            raise ValueError(
                f"dataset has columns {data.column_names}; a tokenized dataset needs an "
                "'input_ids' or 'tokens' column"
            )
        n_rows = len(data)
        if n_tokens is not None and n_rows:
            width = len(data[0][cols[0]])
            n_rows = min(n_rows, math.ceil(n_tokens / max(1, width)))
        rows = list(data.select(range(n_rows))[cols[0]])
        if rows and isinstance(rows[0], torch.Tensor):
            toks = torch.stack(rows)  # a dataset formatted as torch
        else:
            toks = torch.as_tensor(rows)
    else:
        toks = torch.as_tensor(data)
    if toks.ndim != 2:
        raise ValueError(f"tokens must be 2-D [batch, position], got shape {tuple(toks.shape)}")
    if toks.dtype == torch.bool or torch.is_floating_point(toks) or torch.is_complex(toks):
        raise ValueError(f"tokens must be integer ids, got dtype {toks.dtype}")
    if n_tokens is not None:
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        available = toks.numel()
        if available < n_tokens:
            raise ValueError(f"asked for n_tokens = {n_tokens} but the data hold only {available}")
        toks = toks[: math.ceil(n_tokens / toks.shape[1])]
    return toks.long()


def check_tokens(model: Any, tokens: Any) -> torch.Tensor:
    """:func:`as_token_tensor`, then check the rows fit the model (ids in vocabulary, ≤ n_ctx)."""
    toks = as_token_tensor(tokens)
    if toks.shape[0] < 1 or toks.shape[1] < 2:
        raise ValueError(
            f"tokens have shape {tuple(toks.shape)}; need at least 1 row of at least 2 positions"
        )
    d_vocab = getattr(model.cfg, "d_vocab", None)
    lo, hi = int(toks.min().item()), int(toks.max().item())
    if lo < 0 or (d_vocab is not None and d_vocab > 0 and hi >= d_vocab):
        raise ValueError(f"token ids range over [{lo}, {hi}] but must lie in [0, {d_vocab})")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and toks.shape[1] > n_ctx:
        raise ValueError(f"tokens have {toks.shape[1]} positions but the model's n_ctx is {n_ctx}")
    return toks


def input_device(model: Any) -> torch.device:
    """The device the model wants its input tokens on."""
    dev = getattr(model.cfg, "device", None)
    if dev is not None:
        return torch.device(dev)
    return next(model.parameters()).device


def token_batches(toks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive row batches of at most ``batch_size`` rows."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return list(torch.split(toks, batch_size))


# --------------------------------------------------------------------------------------------
# special tokens
# --------------------------------------------------------------------------------------------


def _is_tokenizer(obj: Any) -> bool:
    return any(hasattr(obj, a) for a in ("bos_token_id", "eos_token_id", "pad_token_id"))


def special_token_ids(model: Any, special_tokens: SpecialTokens = None) -> tuple[int, ...]:
    """Sorted ids whose positions are never spliced nor counted (SPEC §8).

    ``special_tokens`` is ``None`` (the special ids of ``model.tokenizer`` per SAELens's
    ``get_special_token_ids``; none if the model has no tokenizer), a tokenizer, or an iterable
    of token ids in ``[0, d_vocab)`` (``()`` keeps every position).
    """
    from sae_lens.util import get_special_token_ids

    source = getattr(model, "tokenizer", None) if special_tokens is None else special_tokens
    if source is None:
        return ()
    if _is_tokenizer(source):
        return tuple(sorted({int(i) for i in get_special_token_ids(source)}))
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise ValueError(
            f"special_tokens must be None, a tokenizer or an iterable of token ids, got {source!r}"
        )
    ids = list(source)
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    for i in ids:
        ok = isinstance(i, int) and not isinstance(i, bool) and i >= 0
        if not ok or (d_vocab and i >= d_vocab):
            raise ValueError(
                f"special token id {i!r} is not a token id in [0, {d_vocab or 'd_vocab'})"
            )
    return tuple(sorted(set(ids)))


def special_token_mask(toks: torch.Tensor, ids: Iterable[int]) -> torch.Tensor | None:
    """Boolean ``[batch, pos]``: True where ``toks`` holds one of ``ids``; ``None`` if ``ids``
    is empty (nothing to exclude)."""
    ids = tuple(ids)
    if not ids:
        return None
    return torch.isin(toks, torch.tensor(ids, dtype=toks.dtype, device=toks.device))


# --------------------------------------------------------------------------------------------
# activation views and widths
# --------------------------------------------------------------------------------------------


def activation_view(
    act: torch.Tensor, head_index: int | None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """An SAE's ``[batch, pos, d]`` view of an activation and the inverse map (as SAELens's
    ``run_evals``): one head with ``head_index``, the heads flattened for 4-D hooks."""
    if act.ndim == 4 and head_index is not None:

        def put(new: torch.Tensor) -> torch.Tensor:
            out = act.clone()
            out[:, :, head_index] = new
            return out

        return act[:, :, head_index], put
    if act.ndim == 4:
        return act.flatten(-2, -1), lambda new: new.reshape(act.shape)
    return act, lambda new: new


class _StopForward(Exception):
    pass


def _grab(model: Any, hook: str, toks: torch.Tensor, head_index: int | None) -> torch.Tensor:
    """The activation view at ``hook`` for ``toks``, running the model only up to the hook."""
    got: list[torch.Tensor] = []

    def grab(act: torch.Tensor, hook: Any) -> None:
        got.append(activation_view(act, head_index)[0].detach())
        raise _StopForward

    with contextlib.suppress(_StopForward):
        model.run_with_hooks(toks.to(input_device(model)), fwd_hooks=[(hook, grab)])
    if not got:
        raise ValueError(f"hook {hook!r} did not fire during a forward pass of the model")
    return got[0]


def activation_width(model: Any, hook: str, toks: torch.Tensor, head_index: int | None) -> int:
    """Width of the activation view at ``hook`` (runs the model up to the hook on 2 tokens)."""
    return int(_grab(model, hook, toks[:1, :2], head_index).shape[-1])


# --------------------------------------------------------------------------------------------
# activation iteration
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def stream_activations(
    model: Any,
    hook: str,
    toks: torch.Tensor,
    *,
    batch_size: int,
    head_index: int | None,
    special_ids: tuple[int, ...],
    progress: bool,
) -> Iterator[torch.Tensor]:
    """:func:`iter_activations` on already validated inputs (canonical hook, checked tokens)."""
    for b in tqdm(token_batches(toks, batch_size), desc="activations", leave=False, disable=not progress):
        act = _grab(model, hook, b, head_index)
        act = act.reshape(-1, act.shape[-1]).float()
        mask = special_token_mask(b, special_ids)
        if mask is not None:
            act = act[~mask.reshape(-1).to(act.device)]
        yield act


def iter_activations(
    model: Any,
    hook_name: str,
    tokens: Any,
    *,
    batch_size: int = 8,
    head_index: int | None = None,
    special_tokens: SpecialTokens = None,
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the activations at ``hook_name`` as flat ``[n, d]`` float tensors, batch by batch
    (head dimensions flattened, or one head with ``head_index``), running the model only up to
    the hook. Positions holding a special token (see :func:`special_token_ids`; by default the
    model tokenizer's) are dropped. Everything is validated before the first forward."""
    toks = check_tokens(model, tokens)
    hook = resolve_hook_name(model, hook_name)
    ids = special_token_ids(model, special_tokens)
    token_batches(toks, batch_size)  # validates batch_size
    return stream_activations(
        model,
        hook,
        toks,
        batch_size=batch_size,
        head_index=head_index,
        special_ids=ids,
        progress=progress,
    )
