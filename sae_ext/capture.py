"""Capture activations at a TransformerLens hook once, store them on disk, and train several
SAEs on the stored activations through SAELens's own runner (``use_cached_activations``).

Capture is SAELens's ``CacheActivationsRunner`` (a ``datasets`` dataset of
``[context_size, d_in]`` rows plus token ids) fed with a model object instead of a model name;
training is ``LanguageModelSAETrainingRunner``. There is no second training loop here.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Array2D, Dataset, Features, Sequence, Value
from sae_lens import (
    CacheActivationsRunnerConfig,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TrainingSAE,
    TrainingSAEConfig,
)
from sae_lens.cache_activations_runner import CacheActivationsRunner, _mk_activations_store

CACHE_INFO = "sae_ext_cache.json"


def check_hook_name(model: Any, hook_name: str) -> str:
    """Return ``hook_name`` if the model accepts it (bridge aliases included), else raise a
    ``ValueError`` listing the closest valid names."""
    from sae_ext.splicing import resolve_hook_name

    resolve_hook_name(model, hook_name)
    return hook_name


def hook_width(model: Any, hook_name: str, context_size: int = 4) -> int:
    """Width of the activation at ``hook_name`` (runs the model on a few tokens)."""
    check_hook_name(model, hook_name)
    toks = torch.ones(1, context_size, dtype=torch.long)
    _, cache = model.run_with_cache(toks, names_filter=[hook_name])
    return int(cache[hook_name].shape[-1])


@dataclass
class ActivationCache:
    """Where a capture lives on disk and what it holds."""

    path: str
    hook_name: str
    d_in: int
    context_size: int
    n_tokens: int
    model_name: str

    def save_info(self) -> None:
        (Path(self.path) / CACHE_INFO).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ActivationCache:
        info = Path(path) / CACHE_INFO
        if not info.is_file():
            raise FileNotFoundError(f"{path} is not an sae_ext activation cache (no {CACHE_INFO})")
        return cls(**json.loads(info.read_text()))

    def activations(self, max_tokens: int | None = None) -> torch.Tensor:
        """The stored activations as one ``[n_tokens, d_in]`` tensor (for analysis on small caches)."""
        ds = Dataset.load_from_disk(self.path).with_format("torch")
        rows = len(ds) if max_tokens is None else min(len(ds), math.ceil(max_tokens / self.context_size))
        acts = ds[:rows][self.hook_name].reshape(-1, self.d_in)
        return acts if max_tokens is None else acts[:max_tokens]


class _ModelCacheActivationsRunner(CacheActivationsRunner):
    """SAELens's ``CacheActivationsRunner`` on a model object instead of a model name."""

    def __init__(self, cfg: CacheActivationsRunnerConfig, model: Any, dataset: Dataset):
        self.cfg = cfg
        self.model = model
        self.activations_store = _mk_activations_store(model, cfg, override_dataset=dataset)
        self.context_size = self._get_sliced_context_size(cfg.context_size, cfg.seqpos_slice)
        self.features = Features(
            {
                cfg.hook_name: Array2D(shape=(self.context_size, cfg.d_in), dtype=cfg.dtype),
                "token_ids": Sequence(Value(dtype="int32"), length=self.context_size),
            }
        )


def capture_activations(
    model: Any,
    token_dataset: Dataset,
    hook_name: str,
    out_dir: str | Path,
    n_tokens: int,
    *,
    model_name: str = "model",
    batch_size_prompts: int = 8,
    dtype: str = "float32",
    n_shards: int = 10,
    overwrite: bool = False,
) -> ActivationCache:
    """Run ``model`` over ``token_dataset`` and store ``n_tokens`` activations at ``hook_name``.

    A cache already at ``out_dir`` with the same hook, model and at least ``n_tokens`` tokens is
    reused. Progress is shown per shard (``n_shards`` shards).
    """
    check_hook_name(model, hook_name)
    context_size = len(token_dataset[0]["input_ids"])
    if n_tokens < context_size:
        raise ValueError(f"n_tokens ({n_tokens}) must be at least the context size ({context_size})")
    available = len(token_dataset) * context_size
    if n_tokens > available:
        raise ValueError(f"n_tokens ({n_tokens}) exceeds the {available} tokens in the dataset")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        try:
            cache = ActivationCache.load(out)
        except FileNotFoundError:
            cache = None
        if (
            cache is not None
            and cache.hook_name == hook_name
            and cache.model_name == model_name
            and cache.context_size == context_size
            and cache.n_tokens >= n_tokens
        ):
            return cache
        if any(out.iterdir()):
            raise FileExistsError(f"{out} exists and holds something else; pass overwrite=True")
    if out.exists():
        shutil.rmtree(out)
    d_in = hook_width(model, hook_name)
    n_seqs = n_tokens // context_size
    batch_size_prompts = max(1, min(batch_size_prompts, n_seqs))
    seqs_per_shard = max(batch_size_prompts, math.ceil(n_seqs / n_shards / batch_size_prompts) * batch_size_prompts)
    bytes_per_token = d_in * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    cfg = CacheActivationsRunnerConfig(
        dataset_path="sae_ext-token-dataset",
        model_name=model_name,
        model_batch_size=batch_size_prompts,
        hook_name=hook_name,
        d_in=d_in,
        training_tokens=n_seqs * context_size,
        context_size=context_size,
        new_cached_activations_path=str(out),
        shuffle=False,
        dtype=dtype,
        device="cpu",
        buffer_size_gb=seqs_per_shard * context_size * bytes_per_token / 1e9,
        prepend_bos=False,  # rows already start with BOS where the tokenizer has one
    )
    _ModelCacheActivationsRunner(cfg, model, token_dataset).run()
    cache = ActivationCache(
        path=str(out),
        hook_name=hook_name,
        d_in=d_in,
        context_size=context_size,
        n_tokens=len(Dataset.load_from_disk(str(out))) * context_size,
        model_name=model_name,
    )
    cache.save_info()
    return cache


def train_on_cache(
    sae_cfg: TrainingSAEConfig,
    cache: ActivationCache,
    model: Any,
    token_dataset: Dataset,
    out_dir: str | Path,
    *,
    training_tokens: int | None = None,
    train_batch_size_tokens: int = 4096,
    lr: float = 3e-4,
    seed: int = 42,
    n_batches_for_norm_estimate: int = 50,
    **runner_kwargs: Any,
) -> TrainingSAE:
    """Train one SAE on a stored capture with SAELens's ``LanguageModelSAETrainingRunner``.

    ``model`` and ``token_dataset`` are only handed to the runner for its constructor and
    evaluator; activations come from the cache. The trained SAE is saved to ``out_dir``
    (inference format, loadable with ``SAE.load_from_disk`` after ``import sae_ext``).
    """
    if sae_cfg.d_in != cache.d_in:
        raise ValueError(f"SAE d_in ({sae_cfg.d_in}) != activation width {cache.d_in} at {cache.hook_name}")
    training_tokens = training_tokens or cache.n_tokens
    n_rows = len(Dataset.load_from_disk(cache.path))
    store_batch = min(8, n_rows)
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=cache.model_name,
        model_class_name="TransformerBridge",
        hook_name=cache.hook_name,
        dataset_path="sae_ext-token-dataset",
        context_size=cache.context_size,
        use_cached_activations=True,
        cached_activations_path=cache.path,
        training_tokens=training_tokens,
        train_batch_size_tokens=train_batch_size_tokens,
        store_batch_size_prompts=store_batch,
        n_batches_in_buffer=max(2, min(32, n_rows // store_batch)),
        lr=lr,
        seed=seed,
        n_batches_for_norm_estimate=n_batches_for_norm_estimate,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(out_dir),
        checkpoint_path=str(Path(out_dir) / "checkpoints"),
        verbose=False,
        **runner_kwargs,
    )
    torch.manual_seed(seed)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=token_dataset, override_model=model)
    return runner.run()
