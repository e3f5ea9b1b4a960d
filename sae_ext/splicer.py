"""The evaluation engine: splice an SAE (or edit the activation) at one hook and meter CE/KL,
computing each forward once per batch (SPEC §4–§5, §8).

A :class:`Splicer` validates the model, the SAE, the hook, the tokens and the special tokens once.
:meth:`Splicer.measure` then runs, per batch, the clean model once and each named
:class:`Intervention` once, feeding its own :class:`Meter`; an intervention may compare itself
(KL, max |Δlogit|) with the clean run or with any earlier intervention of the same call, e.g.
the plain splice ``"sae"``.

The SAE is spliced through SAELens's own ``_SAEWrapper`` (what ``HookedSAETransformer.add_sae``
installs) called from a TransformerLens hook, so ``hook_sae_error`` is SAELens's error node and
the SAE's own hook points fire, on every model class (``HookedTransformer``,
``HookedSAETransformer``, ``TransformerBridge``, ``SAETransformerBridge``), without attaching
anything to the model or touching the SAE's config.

Conventions (those of SAELens's ``run_evals``, so every CE figure of a report shares them):
positions holding a special token (:func:`sae_ext.model_io.special_token_ids`) are left
unspliced, CE is the mean next-token cross-entropy over predicted positions whose input token
is not special (TransformerLens's per-token ``lm_cross_entropy_loss``), and KL is
``KL(reference ‖ setting)`` per non-special position, summed over the vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper
from tqdm.auto import tqdm
from transformer_lens.utils import lm_cross_entropy_loss

from sae_ext.model_io import (
    SpecialTokens,
    activation_view,
    activation_width,
    check_tokens,
    input_device,
    resolve_hook_name,
    special_token_ids,
    special_token_mask,
    stream_activations,
    token_batches,
)
from sae_ext.sae_io import check_sae_hook_names, encode_decode, flat_input_mode, sae_hook_name

__all__ = ["CLEAN", "Intervention", "Meter", "Splicer"]

HookFn = Callable[[torch.Tensor, Any], Any]
#: SAE hook points that belong to SAELens's wrapper rather than to the SAE's own forward.
_WRAPPER_HOOKS = ("hook_sae_error", "hook_sae_output")


@dataclass(frozen=True)
class Intervention:
    """One named way to run the model on a batch (build with :meth:`splice` or
    :meth:`edit_activation`)."""

    name: str
    kind: Literal["clean", "splice", "edit"]
    use_error_term: bool = False
    """Splice: add SAELens's error node (``hook_sae_error``), so the output equals ``x``."""
    sae_hooks: tuple[tuple[str, HookFn], ...] = ()
    """Splice: ``(SAE hook point, fn)`` pairs active during the run (e.g. ablations)."""
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """Splice: ``(x, SAE output) -> new activation`` (e.g. adding the linear error)."""
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Edit: ``x -> new activation`` without the SAE (e.g. removing a subspace)."""
    all_positions: bool = False
    """Edit: also at special positions (the zero ablation of ``run_evals`` does this)."""
    compare_to: tuple[str, ...] = ()
    """Runs this one is compared with (KL and max |Δlogit|): ``"clean"`` or earlier names."""

    @classmethod
    def splice(
        cls,
        name: str,
        *,
        use_error_term: bool = False,
        sae_hooks: Sequence[tuple[str, HookFn]] = (),
        transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        compare_to: Sequence[str] = (),
    ) -> Intervention:
        """The SAE spliced in at the hook (non-special positions)."""
        return cls(
            name,
            "splice",
            use_error_term=use_error_term,
            sae_hooks=tuple(sae_hooks),
            transform=transform,
            compare_to=tuple(compare_to),
        )

    @classmethod
    def edit_activation(
        cls,
        name: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        all_positions: bool = False,
        compare_to: Sequence[str] = (),
    ) -> Intervention:
        """The activation at the hook replaced by ``fn(x)`` (non-special positions by default)."""
        return cls(name, "edit", edit=fn, all_positions=all_positions, compare_to=tuple(compare_to))


#: The unmodified model: always run first, the reference of every comparison.
CLEAN = Intervention("clean", "clean")


class Meter:
    """Running CE of one intervention, and its KL / max |Δlogit| against named references."""

    def __init__(self) -> None:
        self.ce_sum = 0.0
        self.ce_n = 0
        self._kl_sum: dict[str, float] = {}
        self._kl_n: dict[str, int] = {}
        self._max_diff: dict[str, float] = {}

    def add(
        self,
        logits: torch.Tensor,
        toks: torch.Tensor,
        keep: torch.Tensor | None,
        refs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Add a batch: ``keep`` ``[batch, pos]`` marks non-special positions (None: all);
        ``refs`` maps a reference name to its ``(logits, log-probs)``."""
        toks = toks.to(logits.device)
        ce = lm_cross_entropy_loss(logits.float(), toks, per_token=True)
        if keep is not None:
            keep = keep.to(logits.device)
            ce = ce[keep[:, :-1]]
        self.ce_sum += float(ce.double().sum().item())
        self.ce_n += ce.numel()
        if not refs:
            return
        lp = logits.float().log_softmax(-1)
        for name, (ref_logits, ref_lp) in refs.items():
            kl = F.kl_div(lp, ref_lp, reduction="none", log_target=True).sum(-1)
            diff = (logits.float() - ref_logits.float()).abs().amax(-1)
            if keep is not None:
                kl, diff = kl[keep], diff[keep]
            self._kl_sum[name] = self._kl_sum.get(name, 0.0) + float(kl.double().sum().item())
            self._kl_n[name] = self._kl_n.get(name, 0) + kl.numel()
            top = float(diff.max().item()) if diff.numel() else 0.0
            self._max_diff[name] = max(self._max_diff.get(name, 0.0), top)

    @property
    def ce(self) -> float:
        """Mean CE over the counted positions (NaN if none)."""
        return self.ce_sum / self.ce_n if self.ce_n else float("nan")

    def kl(self, ref: str) -> float:
        """Mean ``KL(ref ‖ this)`` per counted position (NaN if never compared with ``ref``)."""
        n = self._kl_n.get(ref, 0)
        return self._kl_sum[ref] / n if n else float("nan")

    def max_abs_diff(self, ref: str) -> float:
        """``max |logits − logits(ref)|`` over counted positions (NaN if never compared)."""
        return self._max_diff.get(ref, float("nan"))


class Splicer:
    """Validated model + SAE + hook + tokens + special tokens; runs interventions batch by batch.

    ``sae`` may be ``None`` for pure activation edits (then ``hook_name`` is required). Raises
    ``ValueError`` before any work for malformed tokens, an unknown hook (listing close names),
    an SAE whose ``d_in`` differs from the activation width, bad special tokens or batch size.
    """

    def __init__(
        self,
        model: Any,
        sae: Any,
        tokens: Any,
        *,
        hook_name: str | None = None,
        special_tokens: SpecialTokens = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.sae = sae
        self.tokens = check_tokens(model, tokens)
        if sae is None and not hook_name:
            raise ValueError("hook_name is required when no SAE is given")
        self.hook = resolve_hook_name(model, sae_hook_name(sae, hook_name) if sae is not None else str(hook_name))
        self.head_index: int | None = sae.cfg.metadata.hook_head_index if sae is not None else None
        token_batches(self.tokens, batch_size)  # validates batch_size
        self.batch_size = batch_size
        self.special_ids = special_token_ids(model, special_tokens)
        self.width = activation_width(model, self.hook, self.tokens, self.head_index)
        if sae is not None and self.width != sae.cfg.d_in:
            raise ValueError(
                f"the activation at {self.hook!r} has width {self.width} but the SAE's d_in is "
                f"{sae.cfg.d_in}; use an SAE trained on this hook (or pass hook_name=)"
            )
        self.progress = progress
        self._wrappers: dict[str, _SAEWrapper] = {}

    # ---- activations ------------------------------------------------------------------------

    def activations(self) -> Iterator[torch.Tensor]:
        """Flat float activations ``[n, width]`` at the hook, batch by batch, special positions
        dropped (each batch runs the model only up to the hook)."""
        return stream_activations(
            self.model,
            self.hook,
            self.tokens,
            batch_size=self.batch_size,
            head_index=self.head_index,
            special_ids=self.special_ids,
            progress=self.progress,
        )

    @torch.no_grad()
    def mean_sae_error(self) -> torch.Tensor:
        """Mean SAE error ``E[x − SAE(x)]`` over non-special positions (float32 ``[d_in]``, CPU)."""
        self._need_sae()
        total = torch.zeros(self.width, dtype=torch.float64)
        n = 0
        for x in self.activations():
            _, out = encode_decode(self.sae, x)
            total += (x - out).double().sum(0).cpu()
            n += x.shape[0]
        if n == 0:
            raise ValueError("every position holds a special token: no activation to average")
        return (total / n).float()

    # ---- forwards -----------------------------------------------------------------------------

    def _need_sae(self) -> None:
        if self.sae is None:
            raise ValueError("this measurement needs an SAE; the Splicer was built without one")

    def _wrapper(self, iv: Intervention) -> _SAEWrapper:
        wrapper = self._wrappers.get(iv.name)
        if wrapper is None:
            wrapper = _SAEWrapper(self.sae, use_error_term=iv.use_error_term)
            for name, fn in iv.sae_hooks:
                if name in _WRAPPER_HOOKS:
                    getattr(wrapper, name).add_hook(fn)
            self._wrappers[iv.name] = wrapper
        return wrapper

    def _splice_hook(self, iv: Intervention, mask: torch.Tensor | None) -> HookFn:
        sae, wrapper = self.sae, self._wrapper(iv)
        mask_sae = mask.to(sae.device) if mask is not None else None

        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            x, put = activation_view(act, self.head_index)
            xs = x.to(device=sae.device, dtype=sae.dtype)
            wrapper.set_token_mask(mask_sae)
            try:
                with flat_input_mode(sae):
                    out = wrapper(xs)
            finally:
                wrapper.set_token_mask(None)
            if iv.transform is not None:
                out = iv.transform(xs, out)
                if mask_sae is not None:
                    out = torch.where(mask_sae[..., None], xs, out)
            return put(out.to(device=act.device, dtype=act.dtype))

        return hook

    def _edit_hook(self, iv: Intervention, mask: torch.Tensor | None) -> HookFn:
        assert iv.edit is not None

        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            x, put = activation_view(act, self.head_index)
            new = iv.edit(x)
            if mask is not None and not iv.all_positions:
                new = torch.where(mask.to(x.device)[..., None], x, new)
            return put(new.to(device=act.device, dtype=act.dtype))

        return hook

    @torch.no_grad()
    def forward(self, iv: Intervention, toks: torch.Tensor) -> torch.Tensor:
        """Logits of one batch of (validated) token rows under ``iv``: one model forward."""
        dev = toks.to(input_device(self.model))
        if iv.kind == "clean":
            return self.model(dev, return_type="logits")
        mask = special_token_mask(toks, self.special_ids)
        if iv.kind == "edit":
            return self.model.run_with_hooks(
                dev, return_type="logits", fwd_hooks=[(self.hook, self._edit_hook(iv, mask))]
            )
        self._need_sae()
        own = [(n, fn) for n, fn in iv.sae_hooks if n not in _WRAPPER_HOOKS]
        ctx = self.sae.hooks(fwd_hooks=own) if own else contextlib.nullcontext()
        with ctx:
            return self.model.run_with_hooks(
                dev, return_type="logits", fwd_hooks=[(self.hook, self._splice_hook(iv, mask))]
            )

    def check(self, interventions: Sequence[Intervention]) -> None:
        """``ValueError`` for duplicate names, unknown references or unknown SAE hook points."""
        seen = {CLEAN.name}
        for iv in interventions:
            if iv.name in seen:
                raise ValueError(f"intervention name {iv.name!r} is used twice (or is 'clean')")
            unknown = [r for r in iv.compare_to if r not in seen]
            if unknown:
                raise ValueError(
                    f"intervention {iv.name!r} compares with {unknown}, which do not run before "
                    f"it; choose from {sorted(seen)}"
                )
            if iv.kind == "splice":
                self._need_sae()
                check_sae_hook_names(self.sae, [n for n, _ in iv.sae_hooks])
            seen.add(iv.name)

    @torch.no_grad()
    def measure(self, interventions: Sequence[Intervention], *, desc: str = "splices") -> dict[str, Meter]:
        """Run the clean model and every intervention once per batch; one :class:`Meter` each
        (keyed by name, ``"clean"`` included)."""
        self.check(interventions)
        referenced = {r for iv in interventions for r in iv.compare_to}
        meters = {CLEAN.name: Meter(), **{iv.name: Meter() for iv in interventions}}
        batches = token_batches(self.tokens, self.batch_size)
        for b in tqdm(batches, desc=desc, leave=False, disable=not self.progress):
            mask = special_token_mask(b, self.special_ids)
            keep = None if mask is None else ~mask
            kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for iv in (CLEAN, *interventions):
                logits = self.forward(iv, b)
                refs = {r: kept[r] for r in iv.compare_to}
                meters[iv.name].add(logits, b, keep, refs)
                if iv.name in referenced:
                    kept[iv.name] = (logits, logits.float().log_softmax(-1))
        return meters
