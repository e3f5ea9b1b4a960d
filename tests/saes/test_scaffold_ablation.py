"""SPEC §2 scaffold ablation vs top-r PCA removal (centred, mean kept), both at non-special
positions only, on a tiny model whose BOS activation is a huge outlier (an attention sink)."""

from __future__ import annotations

from typing import Any

import torch
from sae_lens import HookedSAETransformer
from sae_lens.registry import get_sae_training_class

from sae_ext.interventions import hook_ablation, subspace_basis, subspace_removal
from sae_ext.metrics.pca import top_pca_basis
from sae_ext.splicer import Splicer
from sae_ext.testing import fit_on_stream, tiny_hooked_transformer

HOOK, NEXT = "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"
BOS, D, D_VOCAB, R = 0, 32, 97, 3


def _setup() -> tuple[Any, torch.Tensor, torch.Tensor, Any]:
    torch.manual_seed(0)
    model = tiny_hooked_transformer(cls=HookedSAETransformer)
    with torch.no_grad():
        model.embed.W_E[BOS] *= 1000.0
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, D_VOCAB, (8, 12), generator=g)
    toks[:, 0] = BOS
    toks[::2, 6] = BOS
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    x = cache[HOOK]
    flat = x[toks != BOS]  # SPEC §8: the SAE trains on non-special activations only
    cls, cfg_cls = get_sae_training_class("scaffold_batchtopk")
    sae = cls(cfg_cls(d_in=D, d_sae=2 * D, k=4, scaffold_rank=R))
    sae = fit_on_stream(sae, iter([flat] * 40), 40, flat.shape[0], dead_feature_window=4)
    return model, toks, x, sae


def test_both_ablations_leave_special_positions_untouched_and_pca_removal_keeps_the_mean() -> None:
    model, toks, x, sae = _setup()
    bos = toks == BOS
    flat = x[~bos]
    pca = top_pca_basis(flat, R)
    splicer = Splicer(model, sae, toks, hook_name=HOOK, special_tokens=[BOS], progress=False)
    clean_logits = model(toks)
    for iv in (hook_ablation("hook_scaffold"), subspace_removal(*subspace_basis(pca.basis, pca.mean, D))):
        seen: list[torch.Tensor] = []
        with model.hooks(fwd_hooks=[(NEXT, lambda a, hook, seen=seen: seen.append(a.detach()))]):
            logits = splicer.forward(iv, toks)
        out = seen[0]
        torch.testing.assert_close(out[bos], x[bos], rtol=0, atol=0, msg=iv.name)  # untouched
        torch.testing.assert_close(logits[:, 0], clean_logits[:, 0], rtol=0, atol=1e-6, msg=iv.name)
        assert (out[~bos] - x[~bos]).abs().max() > 1e-3, iv.name  # it did act elsewhere
        if iv.name == "remove_directions":
            q, mu = pca.basis.float(), pca.mean.float()
            # x − ((x − μ) Q) Qᵀ: along Q every non-special position now sits at the mean
            torch.testing.assert_close(out[~bos] @ q, (mu @ q).expand(int((~bos).sum()), R), atol=1e-4, rtol=0)
            torch.testing.assert_close(out[~bos] - out[~bos] @ q @ q.T, flat - flat @ q @ q.T, atol=1e-4, rtol=0)
        else:  # zeroing hook_scaffold with the error term: the model sees x − s
            torch.testing.assert_close(out[~bos], flat - sae.scaffold(flat).detach(), atol=1e-4, rtol=1e-4)
