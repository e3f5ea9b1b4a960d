"""TransformerLens glue: splice an SAE into a model and measure what it costs (SPEC §4–§5).

Every function works for any SAE registered with SAELens (only ``encode``/``decode``/``cfg``/
``W_dec`` and the SAE's own hook points are used) on the four model classes:

* ``HookedSAETransformer`` and ``SAETransformerBridge`` — the SAE is attached with SAELens's
  own ``model.saes(..., use_error_term=...)``, so ``hook_sae_error`` is SAELens's error node;
* plain ``HookedTransformer`` and ``TransformerBridge`` — the same computation is done by a
  replacement hook at the SAE's hook point that calls the SAE's own hook points
  (``hook_sae_error``, ``hook_sae_output``, …) so SAE-internal interventions still apply.

Hook names: a TransformerBridge accepts HookedTransformer-style aliases
(``blocks.0.hook_resid_post`` -> ``blocks.0.hook_out``), but ``run_with_hooks`` silently
ignores names it does not know. :func:`resolve_hook_name` therefore validates every name
(listing the closest valid ones) and maps aliases to the bridge's canonical hook.

CE is the mean next-token cross-entropy over all predicted positions of ``tokens`` (as
TransformerLens's ``return_type="loss"``); KL is ``KL(reference ‖ setting)`` per position,
summed over the vocabulary and averaged over all positions (as SAELens ``run_evals``).
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from sae_ext.metrics.dark_matter import flat_input_mode, linear_error

__all__ = [
    "DarkMatterCE",
    "DirectionRemoval",
    "ErrorNodeAblation",
    "HookAblation",
    "PCAAccumulator",
    "PCABasis",
    "ablate_hook",
    "as_token_tensor",
    "dark_matter_ce",
    "error_node_ablation",
    "iter_activations",
    "loss_recovered",
    "make_activations_store",
    "mean_sae_error",
    "remove_directions_ce",
    "resolve_hook_name",
    "run_spliced",
    "splice_ce",
    "top_pca_basis",
    "valid_hook_names",
    "validate_splice_inputs",
]

SpliceMode = Literal["clean", "sae", "sae+linear", "sae+nonlinear"]
SPLICE_MODES: tuple[str, ...] = ("clean", "sae", "sae+linear", "sae+nonlinear")
HookFn = Callable[[torch.Tensor, Any], Any]


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


def _attached_sae_hooks(model: Any) -> set[str]:
    return set(getattr(model, "_acts_to_saes", None) or {})


def resolve_hook_name(model: Any, name: str) -> str:
    """The canonical hook-point name for ``name`` on ``model``; ``ValueError`` if unknown.

    On a bridge an alias resolves to the hook point it stands for; the error message lists the
    closest valid names (difflib), since TransformerLens itself ignores unknown names silently.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"hook name must be a non-empty string, got {name!r}")
    attached = _attached_sae_hooks(model)
    aliases = _alias_map(model)
    canonical = aliases.get(name, name)
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


def _sae_hook_name(sae: Any, hook_name: str | None) -> str:
    name = hook_name or sae.cfg.metadata.hook_name
    if not name:
        raise ValueError(
            "the SAE has no hook name (sae.cfg.metadata.hook_name is empty); pass hook_name="
        )
    return str(name)


@contextlib.contextmanager
def _hook_name_set(sae: Any, name: str) -> Iterator[None]:
    """Temporarily point ``sae.cfg.metadata.hook_name`` at ``name`` (what SAELens reads)."""
    old = sae.cfg.metadata.hook_name
    sae.cfg.metadata.hook_name = name
    try:
        yield
    finally:
        sae.cfg.metadata.hook_name = old


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


def _check_tokens(model: Any, tokens: Any) -> torch.Tensor:
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


def _input_device(model: Any) -> torch.device:
    dev = getattr(model.cfg, "device", None)
    if dev is not None:
        return torch.device(dev)
    return next(model.parameters()).device


def _batches(toks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(torch.split(toks, batch_size))


# --------------------------------------------------------------------------------------------
# activation views (heads) and width checks
# --------------------------------------------------------------------------------------------


def _sae_view(
    act: torch.Tensor, head_index: int | None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The SAE's flat view of an activation and the inverse map (as SAELens's ``run_evals``)."""
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


def _activation_width(model: Any, hook: str, toks: torch.Tensor, head_index: int | None) -> int:
    """Width the SAE would see at ``hook`` (runs the model up to the hook on one short row)."""
    seen: list[int] = []

    def probe(act: torch.Tensor, hook: Any) -> None:
        seen.append(int(_sae_view(act, head_index)[0].shape[-1]))
        raise _StopForward

    with contextlib.suppress(_StopForward):
        model.run_with_hooks(toks[:1, :2].to(_input_device(model)), fwd_hooks=[(hook, probe)])
    if not seen:
        raise ValueError(f"hook {hook!r} did not fire during a forward pass of the model")
    return seen[0]


def _check_sae_width(model: Any, sae: Any, hook: str, toks: torch.Tensor) -> None:
    width = _activation_width(model, hook, toks, sae.cfg.metadata.hook_head_index)
    if width != sae.cfg.d_in:
        raise ValueError(
            f"the activation at {hook!r} has width {width} but the SAE's d_in is "
            f"{sae.cfg.d_in}; use an SAE trained on this hook (or pass hook_name=)"
        )


def validate_splice_inputs(
    model: Any, sae: Any, tokens: Any, hook_name: str | None
) -> tuple[str, torch.Tensor]:
    """Validate tokens, hook name and SAE width before any work; return (canonical hook, tokens).

    Raises ``ValueError`` for malformed tokens, an unknown hook (listing close names) or an SAE
    whose ``d_in`` differs from the activation width at the hook (naming both).
    """
    toks = _check_tokens(model, tokens)
    hook = resolve_hook_name(model, _sae_hook_name(sae, hook_name))
    _check_sae_width(model, sae, hook, toks)
    return hook, toks


# --------------------------------------------------------------------------------------------
# splicing primitives
# --------------------------------------------------------------------------------------------


def _replace_hook(
    sae: Any, transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> HookFn:
    """Hook replacing the activation by ``transform(x, SAE(x))`` (in the SAE's dtype/device)."""
    head_index = sae.cfg.metadata.hook_head_index

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        x, put = _sae_view(act, head_index)
        xs = x.to(device=sae.device, dtype=sae.dtype)
        with torch.no_grad(), flat_input_mode(sae):
            out = sae.decode(sae.encode(xs))
        return put(transform(xs, out).to(device=act.device, dtype=act.dtype))

    return hook


def _set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parts = path.split(".")
    obj: Any = root
    for p in parts[:-1]:
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    setattr(obj, parts[-1], value)


@contextlib.contextmanager
def _sae_hooks_disabled(sae: Any) -> Iterator[None]:
    """Bypass every hook point of the SAE (for the clean error term, as SAELens does)."""
    saved = dict(sae.hook_dict)
    blank = nn.Identity()
    for name in saved:
        _set_path(sae, name, blank)
    try:
        yield
    finally:
        for name, hp in saved.items():
            _set_path(sae, name, hp)


def _fallback_splice_hook(sae: Any, use_error_term: bool) -> HookFn:
    """What SAELens's ``_SAEWrapper`` computes, as a plain hook (for models without add_sae)."""
    head_index = sae.cfg.metadata.hook_head_index

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        x, put = _sae_view(act, head_index)
        xs = x.to(device=sae.device, dtype=sae.dtype)
        with torch.no_grad(), flat_input_mode(sae):
            out = sae.decode(sae.encode(xs))
            if use_error_term:
                with _sae_hooks_disabled(sae):
                    clean = sae.decode(sae.encode(xs))
                out = out + sae.hook_sae_error(xs - clean)
            out = sae.hook_sae_output(out)
        return put(out.to(device=act.device, dtype=act.dtype))

    return hook


def _get_path(root: Any, path: str) -> Any:
    obj = root
    for p in path.split("."):
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    return obj


@contextlib.contextmanager
def _attached(model: Any, sae: Any, hook: str, use_error_term: bool) -> Iterator[None]:
    """``model.saes([sae], use_error_term=...)`` at ``hook``, restoring the original hook point.

    Workaround (SAELens 6.54 / TransformerLens 3.9): ``SAETransformerBridge._reset_sae``
    installs a *new* ``HookPoint`` whose ``name`` the bridge component renames to the short
    ``"hook_out"``; ``TransformerBridge.run_with_hooks`` then maps ``blocks.0.hook_out`` to the
    unknown alias ``hook_out`` and silently drops every later hook there (the new point also
    lacks the component's ``hook_conversion``). Putting the original object back avoids both.
    """
    registry = getattr(model, "_hook_registry", None)
    orig = _get_path(model, hook) if registry is not None else None
    orig_name = getattr(orig, "name", None)
    try:
        with _hook_name_set(sae, hook), model.saes(saes=[sae], use_error_term=use_error_term):
            yield
    finally:
        if registry is not None and orig is not None:
            _set_path(model, hook, orig)
            orig.name = orig_name
            registry[hook] = orig


def _supports_add_sae(model: Any) -> bool:
    return callable(getattr(model, "add_sae", None)) and callable(getattr(model, "saes", None))


def _check_sae_hook_names(sae: Any, names: Iterable[str]) -> None:
    valid = sorted(sae.hook_dict)
    for n in names:
        if n not in sae.hook_dict:
            close = difflib.get_close_matches(n, valid, n=5, cutoff=0.4)
            raise ValueError(
                f"the SAE ({type(sae).__name__}) has no hook point {n!r}; "
                f"closest: {', '.join(close) or '-'}; all: {', '.join(valid)}"
            )


@torch.no_grad()
def _spliced_logits(
    model: Any,
    sae: Any,
    hook: str,
    toks: torch.Tensor,
    *,
    use_error_term: bool,
    sae_hooks: Sequence[tuple[str, HookFn]] = (),
) -> torch.Tensor:
    toks = toks.to(_input_device(model))
    if _supports_add_sae(model):
        with _attached(model, sae, hook, use_error_term):
            full = [(f"{hook}.{name}", fn) for name, fn in sae_hooks]
            hook_dict = model.hook_dict
            for name, _ in full:
                if name not in hook_dict:
                    raise ValueError(f"hook {name!r} is missing after attaching the SAE")
            return model.run_with_hooks(toks, return_type="logits", fwd_hooks=full)
    with sae.hooks(fwd_hooks=list(sae_hooks)):
        return model.run_with_hooks(
            toks,
            return_type="logits",
            fwd_hooks=[(hook, _fallback_splice_hook(sae, use_error_term))],
        )


@torch.no_grad()
def run_spliced(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    use_error_term: bool = True,
    sae_hooks: Sequence[tuple[str, HookFn]] = (),
    hook_name: str | None = None,
) -> torch.Tensor:
    """Logits of ``model`` on ``tokens`` with ``sae`` spliced in at its hook point.

    ``use_error_term=True`` adds the SAE error back (``hook_sae_error``), so the output equals
    the clean model's up to float tolerance. ``sae_hooks`` are ``(name, fn)`` pairs on the SAE's
    own hook points (``"hook_sae_error"``, ``"hook_sae_acts_post"``, a plugin's
    ``"hook_scaffold"``, …) active during the run.
    """
    hook, toks = validate_splice_inputs(model, sae, tokens, hook_name)
    _check_sae_hook_names(sae, [n for n, _ in sae_hooks])
    return _spliced_logits(
        model, sae, hook, toks, use_error_term=use_error_term, sae_hooks=sae_hooks
    )


# --------------------------------------------------------------------------------------------
# CE / KL accounting
# --------------------------------------------------------------------------------------------


class _Meter:
    """Running sums of per-token CE and of KL against named reference settings."""

    def __init__(self) -> None:
        self.ce_sum = 0.0
        self.ce_n = 0
        self.kl_sum: dict[str, float] = {}
        self.kl_n: dict[str, int] = {}

    def add_ce(self, logits: torch.Tensor, toks: torch.Tensor) -> None:
        lp = logits[:, :-1].float().log_softmax(-1)
        tgt = toks[:, 1:].to(lp.device)
        ce = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        self.ce_sum += float(ce.double().sum().item())
        self.ce_n += ce.numel()

    def add_kl(self, ref: str, ref_logits: torch.Tensor, logits: torch.Tensor) -> None:
        p_log = ref_logits.float().log_softmax(-1)
        q_log = logits.float().log_softmax(-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)
        self.kl_sum[ref] = self.kl_sum.get(ref, 0.0) + float(kl.double().sum().item())
        self.kl_n[ref] = self.kl_n.get(ref, 0) + kl.numel()

    @property
    def ce(self) -> float:
        return self.ce_sum / self.ce_n if self.ce_n else float("nan")

    def kl(self, ref: str) -> float:
        n = self.kl_n.get(ref, 0)
        return self.kl_sum[ref] / n if n else float("nan")


def _pct_recovered(ce_sae: float, ce_setting: float, ce_clean: float) -> float:
    denom = ce_sae - ce_clean
    return (ce_sae - ce_setting) / denom * 100.0 if denom != 0 else float("nan")


def _check_W(W: Any, d_in: int) -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"W must be a tensor [d_in(+1), d_in], got {type(W).__name__}")
    if W.ndim != 2 or W.shape[1] != d_in or W.shape[0] not in (d_in, d_in + 1):
        raise ValueError(
            f"W has shape {tuple(W.shape)}; for sae.cfg.d_in = {d_in} it must be "
            f"[{d_in}, {d_in}] or [{d_in + 1}, {d_in}] (DarkMatterResult.W)"
        )
    bad = int((~torch.isfinite(W)).sum().item())
    if bad:
        raise ValueError(f"W contains {bad} non-finite value(s) (NaN/Inf)")
    return W


def _mode_transform(
    mode: str, W: torch.Tensor | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if mode == "sae":
        return lambda x, out: out
    assert W is not None
    if mode == "sae+linear":
        return lambda x, out: out + linear_error(x, W)
    # sae+nonlinear: SAE(x) + (e - xW) = x - xW
    return lambda x, out: out + ((x - out) - linear_error(x, W))


def _mode_logits(
    model: Any, sae: Any, hook: str, toks: torch.Tensor, mode: str, W: torch.Tensor | None
) -> torch.Tensor:
    toks = toks.to(_input_device(model))
    if mode == "clean":
        return model(toks, return_type="logits")
    fn = _replace_hook(sae, _mode_transform(mode, W))
    return model.run_with_hooks(toks, return_type="logits", fwd_hooks=[(hook, fn)])


@torch.no_grad()
def splice_ce(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    mode: SpliceMode = "sae",
    W: torch.Tensor | None = None,
    hook_name: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean CE with the activation at the SAE's hook replaced according to ``mode``.

    ``"clean"``: untouched; ``"sae"``: ``SAE(x)``; ``"sae+linear"``: ``SAE(x) + x W*``;
    ``"sae+nonlinear"``: ``SAE(x) + (e - x W*)``. ``W`` is :attr:`DarkMatterResult.W`.
    """
    if mode not in SPLICE_MODES:
        raise ValueError(f"mode must be one of {SPLICE_MODES}, got {mode!r}")
    if mode in ("sae+linear", "sae+nonlinear"):
        if W is None:
            raise ValueError(f"mode {mode!r} needs W (the fitted map of dark_matter())")
        W = _check_W(W, sae.cfg.d_in)
    hook, toks = validate_splice_inputs(model, sae, tokens, hook_name)
    meter = _Meter()
    for b in tqdm(
        _batches(toks, batch_size), desc=f"CE ({mode})", leave=False, disable=not progress
    ):
        meter.add_ce(_mode_logits(model, sae, hook, b, mode, W), b)
    return meter.ce


@dataclass
class DarkMatterCE:
    """CE of the dark-matter splices and the share of the SAE's CE gap each one closes."""

    ce_clean: float
    ce_sae: float
    ce_sae_linear: float
    ce_sae_nonlinear: float
    pct_recovered_linear: float
    """``(CE_sae − CE_sae+linear) / (CE_sae − CE_clean) · 100``."""
    pct_recovered_nonlinear: float
    n_tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def dark_matter_ce(
    model: Any,
    sae: Any,
    tokens: Any,
    W: torch.Tensor,
    *,
    hook_name: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> DarkMatterCE:
    """CE of clean / ``SAE(x)`` / ``SAE(x)+linear error`` / ``SAE(x)+nonlinear error`` (SPEC §4)."""
    W = _check_W(W, sae.cfg.d_in)
    hook, toks = validate_splice_inputs(model, sae, tokens, hook_name)
    meters = {m: _Meter() for m in SPLICE_MODES}
    for b in tqdm(
        _batches(toks, batch_size), desc="dark-matter CE", leave=False, disable=not progress
    ):
        for m, meter in meters.items():
            meter.add_ce(_mode_logits(model, sae, hook, b, m, W), b)
    ce = {m: meters[m].ce for m in SPLICE_MODES}
    return DarkMatterCE(
        ce_clean=ce["clean"],
        ce_sae=ce["sae"],
        ce_sae_linear=ce["sae+linear"],
        ce_sae_nonlinear=ce["sae+nonlinear"],
        pct_recovered_linear=_pct_recovered(ce["sae"], ce["sae+linear"], ce["clean"]),
        pct_recovered_nonlinear=_pct_recovered(ce["sae"], ce["sae+nonlinear"], ce["clean"]),
        n_tokens=meters["clean"].ce_n,
    )


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def iter_activations(
    model: Any,
    hook_name: str,
    tokens: Any,
    *,
    batch_size: int = 8,
    head_index: int | None = None,
    exclude_tokens: Iterable[int] | None = None,
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the activations at ``hook_name`` as flat ``[batch·pos, d]`` float tensors, batch by
    batch (head dimensions flattened, or one head with ``head_index``). Positions holding a token
    in ``exclude_tokens`` (e.g. BOS, whose residual norm is an outlier) are dropped, as SAELens's
    ``run_evals`` does with ``exclude_special_tokens``."""
    toks = _check_tokens(model, tokens)
    excluded = torch.tensor(sorted(set(exclude_tokens or ())), dtype=torch.long)
    hook = resolve_hook_name(model, hook_name)
    for b in tqdm(
        _batches(toks, batch_size), desc="activations", leave=False, disable=not progress
    ):
        got: list[torch.Tensor] = []

        def grab(act: torch.Tensor, hook: Any, got: list[torch.Tensor] = got) -> None:
            got.append(_sae_view(act, head_index)[0].detach())
            raise _StopForward

        with contextlib.suppress(_StopForward):
            model.run_with_hooks(b.to(_input_device(model)), fwd_hooks=[(hook, grab)])
        if not got:
            raise ValueError(f"hook {hook!r} did not fire during a forward pass of the model")
        act = got[0].reshape(-1, got[0].shape[-1]).float()
        if excluded.numel():
            act = act[~torch.isin(b.reshape(-1), excluded).to(act.device)]
        yield act


@torch.no_grad()
def mean_sae_error(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    hook_name: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Mean SAE error ``E[x − SAE(x)]`` over all positions of ``tokens`` (float32 ``[d_in]``)."""
    hook, toks = validate_splice_inputs(model, sae, tokens, hook_name)
    total = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    n = 0
    for x in iter_activations(
        model,
        hook,
        toks,
        batch_size=batch_size,
        head_index=sae.cfg.metadata.hook_head_index,
        progress=progress,
    ):
        xs = x.to(device=sae.device, dtype=sae.dtype)
        with flat_input_mode(sae):
            out = sae.decode(sae.encode(xs))
        total += (xs - out).double().sum(0).cpu()
        n += x.shape[0]
    return (total / n).float()


# --------------------------------------------------------------------------------------------
# error node
# --------------------------------------------------------------------------------------------


@dataclass
class ErrorNodeAblation:
    """CE/KL with the SAE's error node zero- or mean-ablated, vs the clean model and the plain splice."""

    mode: str
    ce_clean: float
    ce_spliced: float
    """With the error term: must equal ``ce_clean`` up to float tolerance."""
    ce_sae: float
    """Plain splice ``SAE(x)`` (no error term)."""
    ce_ablated: float
    delta_ce_vs_clean: float
    delta_ce_vs_sae: float
    kl_sae_vs_clean: float
    kl_ablated_vs_clean: float
    kl_ablated_vs_sae: float
    max_abs_logit_diff_spliced: float
    """``max |logits(spliced with error term) − logits(clean)|``: the reproduction check."""
    n_tokens: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@torch.no_grad()
def error_node_ablation(
    model: Any,
    sae: Any,
    tokens: Any,
    mode: Literal["zero", "mean"] = "zero",
    *,
    hook_name: str | None = None,
    mean_error: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> ErrorNodeAblation:
    """Splice the SAE with its error term and zero- or mean-ablate ``hook_sae_error`` (SPEC §5).

    On ``HookedSAETransformer``/``SAETransformerBridge`` the SAE is attached with
    ``model.saes(use_error_term=True)`` and SAELens's own error node is ablated; on plain
    models the same computation runs through a hook. ``mode="mean"`` replaces the error by its
    mean over ``tokens`` (or by ``mean_error`` if given).
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    hook, toks = validate_splice_inputs(model, sae, tokens, hook_name)
    if mode == "mean":
        if mean_error is None:
            mean_error = mean_sae_error(
                model, sae, toks, hook_name=hook, batch_size=batch_size, progress=progress
            )
        if tuple(mean_error.shape) != (sae.cfg.d_in,):
            raise ValueError(
                f"mean_error has shape {tuple(mean_error.shape)}, expected ({sae.cfg.d_in},)"
            )
        fill = mean_error.to(device=sae.device, dtype=sae.dtype)

        def ablate(err: torch.Tensor, hook: Any) -> torch.Tensor:
            return fill.to(err.dtype).expand_as(err).clone()
    else:

        def ablate(err: torch.Tensor, hook: Any) -> torch.Tensor:
            return torch.zeros_like(err)

    m_clean, m_spl, m_sae, m_abl = _Meter(), _Meter(), _Meter(), _Meter()
    max_diff = 0.0
    for b in tqdm(
        _batches(toks, batch_size), desc=f"error node ({mode})", leave=False, disable=not progress
    ):
        clean = _mode_logits(model, sae, hook, b, "clean", None)
        spliced = _spliced_logits(model, sae, hook, b, use_error_term=True)
        plain = _spliced_logits(model, sae, hook, b, use_error_term=False)
        ablated = _spliced_logits(
            model, sae, hook, b, use_error_term=True, sae_hooks=[("hook_sae_error", ablate)]
        )
        max_diff = max(max_diff, float((spliced.float() - clean.float()).abs().max().item()))
        m_clean.add_ce(clean, b)
        m_spl.add_ce(spliced, b)
        m_sae.add_ce(plain, b)
        m_sae.add_kl("clean", clean, plain)
        m_abl.add_ce(ablated, b)
        m_abl.add_kl("clean", clean, ablated)
        m_abl.add_kl("sae", plain, ablated)
    return ErrorNodeAblation(
        mode=mode,
        ce_clean=m_clean.ce,
        ce_spliced=m_spl.ce,
        ce_sae=m_sae.ce,
        ce_ablated=m_abl.ce,
        delta_ce_vs_clean=m_abl.ce - m_clean.ce,
        delta_ce_vs_sae=m_abl.ce - m_sae.ce,
        kl_sae_vs_clean=m_sae.kl("clean"),
        kl_ablated_vs_clean=m_abl.kl("clean"),
        kl_ablated_vs_sae=m_abl.kl("sae"),
        max_abs_logit_diff_spliced=max_diff,
        n_tokens=m_clean.ce_n,
    )


# --------------------------------------------------------------------------------------------
# SAE-internal hook ablation (scaffold) and subspace removal (PCA)
# --------------------------------------------------------------------------------------------


@dataclass
class HookAblation:
    """CE with an SAE-internal hook zeroed while the SAE is spliced."""

    sae_hook: str
    use_error_term: bool
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    ce_ratio: float
    """``CE_ablated / CE_clean`` (the scaffold paper's "×" numbers)."""
    ce_increase: float
    kl_ablated_vs_clean: float
    n_tokens: int

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


@torch.no_grad()
def ablate_hook(
    model: Any,
    sae: Any,
    tokens: Any,
    sae_hook: str = "hook_scaffold",
    *,
    use_error_term: bool = True,
    hook_name: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> HookAblation:
    """Zero the SAE's hook point ``sae_hook`` while the SAE is spliced and report the CE.

    With ``use_error_term=True`` (default) the error node is computed from the un-ablated SAE,
    so the model sees ``x`` minus the ablated component only — for ``hook_scaffold`` that is
    ``x − s``, directly comparable with :func:`remove_directions_ce` on the top-r PCA basis.
    """
    _check_sae_hook_names(sae, [sae_hook])
    hook, toks = validate_splice_inputs(model, sae, tokens, hook_name)

    def zero(t: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(t)

    m_clean, m_spl, m_abl = _Meter(), _Meter(), _Meter()
    for b in tqdm(
        _batches(toks, batch_size), desc=f"ablate {sae_hook}", leave=False, disable=not progress
    ):
        clean = _mode_logits(model, sae, hook, b, "clean", None)
        m_clean.add_ce(clean, b)
        m_spl.add_ce(_spliced_logits(model, sae, hook, b, use_error_term=use_error_term), b)
        ablated = _spliced_logits(
            model, sae, hook, b, use_error_term=use_error_term, sae_hooks=[(sae_hook, zero)]
        )
        m_abl.add_ce(ablated, b)
        m_abl.add_kl("clean", clean, ablated)
    return HookAblation(
        sae_hook=sae_hook,
        use_error_term=use_error_term,
        ce_clean=m_clean.ce,
        ce_spliced=m_spl.ce,
        ce_ablated=m_abl.ce,
        ce_ratio=m_abl.ce / m_clean.ce if m_clean.ce else float("nan"),
        ce_increase=m_abl.ce - m_clean.ce,
        kl_ablated_vs_clean=m_abl.kl("clean"),
        n_tokens=m_clean.ce_n,
    )


@dataclass
class DirectionRemoval:
    """CE with a subspace projected out of the activation at one hook."""

    hook_name: str
    rank: int
    ce_clean: float
    ce_removed: float
    ce_ratio: float
    """``CE_removed / CE_clean``."""
    ce_increase: float
    kl_removed_vs_clean: float
    n_tokens: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _orthonormal(basis: torch.Tensor, d: int) -> torch.Tensor:
    if not isinstance(basis, torch.Tensor) or basis.ndim != 2:
        raise ValueError(
            f"basis must be a 2-D tensor [d, r], got {getattr(basis, 'shape', basis)!r}"
        )
    if basis.shape[0] != d:
        raise ValueError(
            f"basis has shape {tuple(basis.shape)} but the activation width is {d}; "
            f"expected [{d}, r]"
        )
    r = basis.shape[1]
    if not 1 <= r <= d:
        raise ValueError(f"basis rank r = {r} must lie in [1, {d}]")
    bad = int((~torch.isfinite(basis)).sum().item())
    if bad:
        raise ValueError(f"basis contains {bad} non-finite value(s) (NaN/Inf)")
    q, rr = torch.linalg.qr(basis.double())
    diag = rr.diagonal().abs()
    if bool((diag <= 1e-10 * diag.max().clamp_min(1e-300)).any()):
        raise ValueError(f"basis columns are linearly dependent (rank < {r})")
    return q


@torch.no_grad()
def remove_directions_ce(
    model: Any,
    hook_name: str,
    basis: torch.Tensor,
    tokens: Any,
    *,
    center: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> DirectionRemoval:
    """CE after projecting the span of ``basis`` ``[d, r]`` out of the activation at ``hook_name``.

    ``x ← x − ((x − c) Q) Qᵀ`` with ``Q`` an orthonormal basis of the columns (QR) and ``c`` =
    ``center`` (default 0). Use :func:`top_pca_basis` for the top-r PCA directions.
    """
    toks = _check_tokens(model, tokens)
    hook = resolve_hook_name(model, hook_name)
    d = _activation_width(model, hook, toks, None)
    q = _orthonormal(basis, d)
    c = torch.zeros(d, dtype=torch.float64) if center is None else center.double().reshape(-1)
    if c.shape != (d,):
        raise ValueError(f"center has {c.numel()} values but the activation width is {d}")

    def project_out(act: torch.Tensor, hook: Any) -> torch.Tensor:
        x, put = _sae_view(act, None)
        qq, cc = q.to(x.device), c.to(x.device)
        x64 = x.double()
        new = x64 - ((x64 - cc) @ qq) @ qq.T
        return put(new.to(act.dtype))

    m_clean, m_rem = _Meter(), _Meter()
    for b in tqdm(
        _batches(toks, batch_size), desc="remove directions", leave=False, disable=not progress
    ):
        bd = b.to(_input_device(model))
        clean = model(bd, return_type="logits")
        removed = model.run_with_hooks(bd, return_type="logits", fwd_hooks=[(hook, project_out)])
        m_clean.add_ce(clean, b)
        m_rem.add_ce(removed, b)
        m_rem.add_kl("clean", clean, removed)
    return DirectionRemoval(
        hook_name=hook,
        rank=int(q.shape[1]),
        ce_clean=m_clean.ce,
        ce_removed=m_rem.ce,
        ce_ratio=m_rem.ce / m_clean.ce if m_clean.ce else float("nan"),
        ce_increase=m_rem.ce - m_clean.ce,
        kl_removed_vs_clean=m_rem.kl("clean"),
        n_tokens=m_clean.ce_n,
    )


@dataclass
class PCABasis:
    """Top principal directions of a set of activations."""

    basis: torch.Tensor
    """float64 ``[d, r]``, orthonormal columns, by decreasing variance."""
    mean: torch.Tensor
    """float64 ``[d]``."""
    explained_variance_ratio: torch.Tensor
    """float64 ``[r]``: each direction's share of the total variance."""


class PCAAccumulator:
    """One-pass float64 second-moment accumulator for :func:`top_pca_basis` (``O(d²)`` memory)."""

    def __init__(self) -> None:
        self.xx: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        """Add activations ``[..., d]`` (finite floats)."""
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or not torch.is_floating_point(x):
            raise ValueError("activations must be a float tensor [..., d]")
        bad = int((~torch.isfinite(x)).sum().item())
        if bad:
            raise ValueError(f"activations contain {bad} non-finite value(s) (NaN/Inf)")
        x64 = x.reshape(-1, x.shape[-1]).double().cpu()
        if self.xx is None:
            d = x64.shape[1]
            self.xx = torch.zeros(d, d, dtype=torch.float64)
            self.sum = torch.zeros(d, dtype=torch.float64)
        elif x64.shape[1] != self.xx.shape[0]:
            raise ValueError(
                f"activations have width {x64.shape[1]}, earlier batches {self.xx.shape[0]}"
            )
        assert self.sum is not None
        self.xx += x64.T @ x64
        self.sum += x64.sum(0)
        self.n += x64.shape[0]

    def result(self, r: int, *, center: bool = True) -> PCABasis:
        """Top-``r`` directions of the (centred, by default) covariance."""
        if self.xx is None or self.sum is None or self.n < 2:
            raise ValueError(f"need at least 2 activation vectors for PCA, got {self.n}")
        d = self.xx.shape[0]
        if not 1 <= r <= d:
            raise ValueError(f"r = {r} must lie in [1, d = {d}]")
        n = self.n
        mean = self.sum / n if center else torch.zeros_like(self.sum)
        cov = (self.xx - n * torch.outer(mean, mean)) / n
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        total = evals.sum()
        ratio = evals[:r] / total if total > 0 else torch.zeros(r, dtype=torch.float64)
        return PCABasis(basis=evecs[:, :r].contiguous(), mean=mean, explained_variance_ratio=ratio)


def top_pca_basis(
    activations: torch.Tensor | Iterable[torch.Tensor], r: int, *, center: bool = True
) -> PCABasis:
    """Top-``r`` PCA directions of activations ``[..., d]`` (a tensor or an iterable of batches),
    from a float64 second-moment matrix accumulated in one pass."""
    acc = PCAAccumulator()
    for x in [activations] if isinstance(activations, torch.Tensor) else activations:
        acc.update(x)
    return acc.result(r, center=center)


# --------------------------------------------------------------------------------------------
# SAELens run_evals
# --------------------------------------------------------------------------------------------


def make_activations_store(
    model: Any,
    sae: Any,
    tokens: Any,
    *,
    hook_name: str | None = None,
    batch_size_prompts: int = 8,
    device: str | torch.device | None = None,
) -> Any:
    """A SAELens ``ActivationsStore`` over pretokenized rows (a tensor, lists or a tokenized
    ``Dataset``) at the SAE's hook, as ``run_evals`` needs. The context size is the row length;
    the caller's dataset is copied, never mutated."""
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    toks = _check_tokens(model, tokens)
    hook = resolve_hook_name(model, _sae_hook_name(sae, hook_name))
    if batch_size_prompts < 1:
        raise ValueError(f"batch_size_prompts must be >= 1, got {batch_size_prompts}")
    ds = Dataset.from_dict({"input_ids": toks.tolist()})
    return ActivationsStore(
        model=model,
        dataset=ds,
        streaming=False,
        hook_name=hook,
        hook_head_index=sae.cfg.metadata.hook_head_index,
        context_size=int(toks.shape[1]),
        d_in=int(sae.cfg.d_in),
        n_batches_in_buffer=2,
        total_training_tokens=len(ds),
        store_batch_size_prompts=min(batch_size_prompts, toks.shape[0]),
        train_batch_size_tokens=min(4096, toks.numel()),
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device(device) if device is not None else _input_device(model),
        dtype=str(sae.cfg.dtype),
    )


def loss_recovered(
    model: Any,
    sae: Any,
    tokens_or_store: Any,
    *,
    n_batches: int | None = None,
    batch_size_prompts: int = 8,
    hook_name: str | None = None,
    exclude_special_tokens: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """SAELens ``run_evals`` metrics, flattened: ``ce_loss_score`` (CE loss recovered),
    ``kl_div_score``, the CE/KL with SAE / without / zero-ablated, ``explained_variance``,
    ``mse``, ``cossim``, ``l0``, ``l1``, L2 ratios and the token counts.

    ``tokens_or_store`` is an ``ActivationsStore`` or pretokenized rows (see
    :func:`make_activations_store`); ``n_batches`` defaults to every full batch of the rows.
    Special tokens (BOS/EOS/PAD) are excluded when the model has a tokenizer.
    """
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    hook = resolve_hook_name(model, _sae_hook_name(sae, hook_name))
    if isinstance(tokens_or_store, ActivationsStore):
        store = tokens_or_store
        if resolve_hook_name(model, store.hook_name) != hook:
            raise ValueError(
                f"the store reads hook {store.hook_name!r} but the SAE's hook is {hook!r}"
            )
        n_rows = None
    else:
        toks = _check_tokens(model, tokens_or_store)
        _check_sae_width(model, sae, hook, toks)
        store = make_activations_store(
            model, sae, toks, hook_name=hook, batch_size_prompts=batch_size_prompts
        )
        n_rows = toks.shape[0]
    bs = store.store_batch_size_prompts
    if n_batches is None:
        n_batches = max(1, (n_rows or bs) // bs)
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    cfg = EvalConfig(
        batch_size_prompts=bs,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    exclude = exclude_special_tokens and getattr(model, "tokenizer", None) is not None
    with _hook_name_set(sae, hook):
        metrics, _ = run_evals(
            sae,
            store,
            model,
            ActivationScaler(),
            cfg,
            exclude_special_tokens=exclude,
            verbose=progress,
        )
    flat: dict[str, float] = {}
    for group in metrics.values():
        for k, v in group.items():
            flat[k] = float(v)
    return flat
