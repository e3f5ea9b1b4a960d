"""Small, offline fixtures shared by the tests, tutorials and benchmarks.

A tiny ``HookedTransformer`` built from a config (random weights, no download) and a
token dataset, so anything that needs "a model" runs in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from datasets import Dataset
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig, TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer, HookedTransformerConfig


def tiny_hooked_transformer(
    d_model: int = 32,
    n_layers: int = 2,
    d_vocab: int = 97,
    n_ctx: int = 32,
    seed: int = 0,
    cls: type[HookedTransformer] = HookedTransformer,
    device: str = "cpu",
) -> HookedTransformer:
    """A randomly initialised attention+MLP transformer (no tokenizer).

    Pass ``cls=HookedSAETransformer`` to get one that SAEs can be spliced into.
    """
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=8,
        n_heads=d_model // 8,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device=device,
    )
    model = cls(cfg)
    model.eval()
    return model


def random_token_dataset(
    n_rows: int = 64, context_size: int = 16, d_vocab: int = 97, seed: int = 0
) -> Dataset:
    """A pretokenized ``datasets.Dataset`` with an ``input_ids`` column of random tokens."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, d_vocab, (n_rows, context_size), generator=g)
    return Dataset.from_dict({"input_ids": toks.tolist()})


#: Sparsity settings small enough for d_sae = 4 * d_in test SAEs, applied by field name.
_SMALL_DEFAULTS: dict[str, Any] = {"k": 4}


def small_training_config(
    architecture: str, d_in: int = 32, d_sae: int = 128, **overrides: Any
) -> TrainingSAEConfig:
    """The registered training config of ``architecture`` at a small width.

    Only fields the config actually has are set (``k`` for the TopK family); everything
    else keeps the architecture's own defaults, so the defaults themselves are tested.
    """
    cfg_cls = get_sae_training_class(architecture)[1]
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    kwargs = {k: v for k, v in _SMALL_DEFAULTS.items() if k in names}
    kwargs.update(overrides)
    return cfg_cls(d_in=d_in, d_sae=d_sae, **kwargs)


def train_step_input(x: torch.Tensor, d_sae: int, logging: bool = False) -> TrainStepInput:
    """A ``TrainStepInput`` for calling ``training_forward_pass`` directly: no coefficients, no dead
    latents, step 0 (``logging`` sets ``is_logging_step``)."""
    return TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=torch.zeros(d_sae, dtype=torch.bool),
        n_training_steps=0,
        is_logging_step=logging,
    )


def fit_on_stream(
    sae: TrainingSAE,
    batches: Iterator[torch.Tensor],
    steps: int,
    batch_size: int,
    lr: float = 3e-3,
    **trainer_overrides: Any,
) -> TrainingSAE:
    """Train ``sae`` for ``steps`` steps with SAELens's own ``SAETrainer`` on in-memory batches.

    Constant learning rate unless ``trainer_overrides`` say otherwise (``lr_end``,
    ``lr_scheduler_name``, ``lr_warm_up_steps``); the overrides go to ``SAETrainerConfig`` (e.g. the
    dead-feature and feature-sampling windows), so short test runs still reach the trainer's
    periodic paths.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        **{"lr_end": lr, **trainer_overrides},
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=batches).fit()


def tiny_bridge(d_model: int = 32, d_vocab: int = 97, n_layers: int = 2, seed: int = 0, device: str = "cpu") -> Any:
    """A randomly initialised GPT-2 booted as an ``SAETransformerBridge`` (TransformerBridge), offline.

    The tokenizer is an in-memory WordLevel tokenizer (``t1 t2 …``); ``name_or_path`` and
    ``add_bos_token=True`` stop TransformerLens from re-loading the tokenizer by name (a download).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from sae_ext.models import SAEBridge

    vocab = {"<bos>": 0, **{f"t{i}": i for i in range(1, d_vocab)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<bos>",
        unk_token="t1",
        name_or_path="tiny-wordlevel",
        add_bos_token=True,
    )
    cfg = GPT2Config(
        vocab_size=d_vocab, n_positions=32, n_embd=d_model, n_layer=n_layers, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(cfg).eval().to(device)  # boot_transformers leaves a given model where it is
    bridge = SAEBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer, device=device)
    bridge.eval()
    return bridge


def tiny_word_tokenizer(words: list[str], unk_token: str = "<unk>") -> Any:
    """An in-memory whitespace WordLevel tokenizer over ``<bos>``, ``unk_token``, ``words``, the
    spelling template's words and the capital letters: enough for the absorption prompts
    (``"{word} has the first letter: L"``) on a tiny model, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra = ["has", "the", "first", "letter:", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    names = dict.fromkeys(["<bos>", unk_token, *words, *extra])
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(names)}, unk_token=unk_token))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", pad_token="<bos>", unk_token=unk_token
    )
