"""Rebuild ``docs/img/dashboard_signed_latent.png``, the README's dashboard screenshot.

No SmolLM2 SAE is stored in the repository, so the screenshot comes from a small, fully
offline setup that shows the page layout on real text: a randomly initialised 2-layer GPT-2
(TransformerBridge) with a word-level tokenizer built from the embedded Python-docs text, an
SA-GSAE trained for a few hundred steps on its ``blocks.1.hook_resid_post`` activations (scaled
to E‖x‖² = d_in, the scale folded back afterwards), and
``build_dashboard`` on held-out text. The latents of a random model track words and positions,
not concepts: the picture documents the layout, not a finding. Needs Debian's ``chromium``.

    .venv/bin/python docs/make_dashboard_screenshot.py [--out docs/img/dashboard_signed_latent.png]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HOOK = "blocks.1.hook_resid_post"
CONTEXT = 64
PIECE = re.compile(r" ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]")


def word_tokenizer(texts: list[str], size: int = 3000):
    """A word-level tokenizer whose pieces keep their leading space (so decoded tokens read
    as text): the ``size - 2`` commonest pieces of ``texts`` plus ``<bos>`` and ``<unk>``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = collections.Counter(p for t in texts for p in PIECE.findall(t))
    vocab = {"<bos>": 0, "<unk>": 1}
    for piece, _ in counts.most_common(size - 2):
        vocab[piece] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE.pattern), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<bos>", pad_token="<bos>",
        unk_token="<unk>", name_or_path="python-docs-words", add_bos_token=True,
        clean_up_tokenization_spaces=False,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/img/dashboard_signed_latent.png"))
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs Debian's chromium: apt-get install -y chromium")

    from transformers import GPT2Config, GPT2LMHeadModel

    from sae_ext.dashboard import build_dashboard
    from sae_ext.data import default_paragraphs, tokenize_texts
    from sae_ext.model_io import iter_activations
    from sae_ext.models import SAEBridge
    from sae_ext.saes.sign_aware_gated import (
        SignAwareGatedTrainingSAE,
        SignAwareGatedTrainingSAEConfig,
    )
    from sae_ext.testing import fit_on_stream

    torch.manual_seed(0)
    train_text, eval_text = default_paragraphs("train"), default_paragraphs("eval")
    tokenizer = word_tokenizer(train_text)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=64, n_layer=2,
                     n_head=4, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = SAEBridge.boot_transformers(
        "gpt2", hf_model=GPT2LMHeadModel(cfg).eval(), tokenizer=tokenizer, device="cpu"
    )
    model.eval()
    train = tokenize_texts(train_text, tokenizer, context_size=CONTEXT, n_tokens=100_000)
    acts = torch.cat(list(iter_activations(model, HOOK, train, batch_size=64)))
    # train on inputs scaled to E‖x‖² = d_in (the SA-GSAE defaults are in those units), then
    # fold the scale into the weights, as SAELens does on save
    scale = float((acts.shape[1] / acts.pow(2).sum(-1).mean()).sqrt())
    acts = acts[torch.randperm(acts.shape[0])] * scale

    def batches():
        while True:
            yield from acts.split(512)

    sae = SignAwareGatedTrainingSAE(SignAwareGatedTrainingSAEConfig(d_in=64, d_sae=256))
    fit_on_stream(sae, batches(), steps=args.steps, batch_size=512)
    sae.cfg.metadata.hook_name = HOOK
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        from sae_ext.loading import load_sae

        inference = load_sae(tmp)
    inference.fold_activation_norm_scaling_factor(scale)
    held_out = tokenize_texts(eval_text, tokenizer, context_size=CONTEXT, n_tokens=16_384)
    out_dir = Path(tempfile.mkdtemp(prefix="dashboard_"))
    dash = build_dashboard(inference, model, held_out, out_dir=out_dir, top=8, rank_by="bipolar")
    first = next(iter(dash.pages.values()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-background-networking", "--no-first-run", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",
             "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=15000",
             "--window-size=1150,1500", f"--screenshot={args.out.resolve()}", first.as_uri()],
            check=True, capture_output=True,
        )  # fmt: skip
    print(f"dashboard in {out_dir}; screenshot of {first.name} -> {args.out}")


if __name__ == "__main__":
    main()
