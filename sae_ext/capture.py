"""Capture activations at TransformerLens hooks once, store them on disk, and train several
SAEs on the stored activations with SAELens's own trainer.

The store is SAELens's cached-activations format (a ``datasets`` dataset of ``[context_size, d_in]``
rows per hook plus the token ids), so SAELens's ``ActivationsStore`` can read it too
(``use_cached_activations``). Training is SAELens's ``SAETrainer`` configured by a
``LanguageModelSAERunnerConfig`` with SPEC §8 applied (:mod:`sae_ext.protocol`), fed from memory by
:mod:`sae_ext.cache_stream`. There is no second training loop here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Array2D, Dataset, Features, Value, concatenate_datasets
from datasets import Sequence as ArrowList
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LoggingConfig,
    SAETrainer,
    TrainingSAE,
    TrainingSAEConfig,
)
from sae_lens.constants import (
    ACTIVATION_SCALER_CFG_FILENAME,
    RUNNER_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
)
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sae_ext.cache_stream import CachedActivationBatches, read_cached_column
from sae_ext.model_io import input_device, resolve_hook_name
from sae_ext.protocol import apply_protocol

CACHE_INFO = "sae_ext_cache.json"
#: Storage types of a capture (Arrow has no bfloat16).
STORAGE_DTYPES = frozenset({"float32", "float16"})
#: Where train_on_cache keeps its mid-run checkpoints, inside its output folder.
CHECKPOINTS_DIR = "checkpoints"
#: What train_on_cache records of the protocol it applied, beside the saved SAE.
PROTOCOL_FILE = "sae_ext_protocol.json"


def check_hook_name(model: Any, hook_name: str) -> str:
    """Return ``hook_name`` if the model accepts it (bridge aliases included), else raise a
    ``ValueError`` listing the closest valid names."""
    resolve_hook_name(model, hook_name)
    return hook_name


def hook_width(model: Any, hook_name: str, context_size: int = 4) -> int:
    """Width of the activation at ``hook_name`` (runs the model on a few tokens)."""
    check_hook_name(model, hook_name)
    toks = torch.ones(1, context_size, dtype=torch.long, device=input_device(model))
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
    dtype: str = "float32"  # storage type

    @classmethod
    def load(cls, path: str | Path, hook_name: str | None = None) -> ActivationCache:
        """The capture at ``path``; ``hook_name`` picks one hook of a multi-hook capture."""
        info_path = Path(path) / CACHE_INFO
        if not info_path.is_file():
            raise FileNotFoundError(f"{path} is not an sae_ext activation cache (no {CACHE_INFO})")
        info = json.loads(info_path.read_text())
        hooks = info["hook_names"]
        if hook_name is None:
            if len(hooks) != 1:
                raise ValueError(f"{path} holds several hooks {hooks}; pass hook_name")
            hook_name = hooks[0]
        if hook_name not in hooks:
            raise ValueError(f"{path} holds no hook {hook_name!r}; it holds {hooks}")
        return cls(
            path=str(path), hook_name=hook_name, d_in=info["d_ins"][hook_name],
            context_size=info["context_size"], n_tokens=info["n_tokens"], model_name=info["model_name"],
            dtype=info.get("dtype", "float32"),
        )

    def token_ids(self, max_tokens: int | None = None) -> torch.Tensor:
        """The stored token id of every position, ``[n_tokens]`` (matches :meth:`activations`)."""
        return read_cached_column(self.path, "token_ids", self.context_size, max_tokens).long()

    def activations(self, max_tokens: int | None = None) -> torch.Tensor:
        """The stored activations as one float32 ``[n_tokens, d_in]`` tensor."""
        return read_cached_column(self.path, self.hook_name, self.context_size, max_tokens).float()

    def kept_activations(self, exclude_token_ids: Sequence[int]) -> torch.Tensor:
        """The stored float32 activations at positions whose token id is not in
        ``exclude_token_ids`` (SPEC §8: special tokens enter no statistic), ``[n_kept, d_in]``."""
        ids = torch.as_tensor(list(exclude_token_ids), dtype=torch.long)
        if ids.ndim != 1 or bool((ids < 0).any()):
            raise ValueError(f"exclude_token_ids must be token ids >= 0, got {list(exclude_token_ids)!r}")
        return self.activations()[~torch.isin(self.token_ids(), ids)]


def _storage_dtype(dtype: str) -> torch.dtype:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def _reusable(out: Path, hooks: list[str], model_name: str, context_size: int, n_tokens: int) -> bool:
    try:
        info = json.loads((out / CACHE_INFO).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (
        set(hooks) <= set(info.get("hook_names", [info.get("hook_name")]))
        and info.get("model_name") == model_name
        and info.get("context_size") == context_size
        and info.get("n_tokens", 0) >= n_tokens
    )


def capture_hooks(
    model: Any,
    token_dataset: Dataset,
    hook_names: Sequence[str],
    out_dir: str | Path,
    n_tokens: int | None = None,
    *,
    model_name: str = "model",
    batch_size_prompts: int = 8,
    dtype: str = "float32",
    rows_per_shard: int = 256,
    overwrite: bool = False,
) -> dict[str, ActivationCache]:
    """Run ``model`` once over ``token_dataset`` and store the activations at every hook of
    ``hook_names`` for ``n_tokens`` tokens (default: the whole dataset).

    The store is one ``datasets`` dataset in SAELens's cached-activations format (a
    ``[context_size, d_in]`` column per hook plus ``token_ids``), so SAELens's ``ActivationsStore``
    reads it with ``use_cached_activations`` and its ``exclude_special_tokens`` switch filters it
    by token id (SPEC §8). Every position is stored; nothing is filtered at capture time. SAELens's
    ``CacheActivationsRunner`` captures one hook per model pass; here one pass serves all hooks.
    ``dtype`` is the storage type (``float16`` halves the disk; see ``benchmarks/RESULTS.md``).
    A cache at ``out_dir`` holding these hooks for at least ``n_tokens`` tokens is reused.
    """
    hooks = list(dict.fromkeys(hook_names))
    if not hooks:
        raise ValueError("hook_names must name at least one hook")
    for hook in hooks:
        check_hook_name(model, hook)
    np_dtype = _storage_dtype(dtype)
    if len(token_dataset) == 0 or "input_ids" not in token_dataset.column_names:
        raise ValueError("token_dataset must be a non-empty dataset with an 'input_ids' column")
    context_size = len(token_dataset[0]["input_ids"])
    available = len(token_dataset) * context_size
    n_tokens = available if n_tokens is None else n_tokens
    if n_tokens < context_size:
        raise ValueError(f"n_tokens ({n_tokens}) must be at least the context size ({context_size})")
    if n_tokens > available:
        raise ValueError(f"n_tokens ({n_tokens}) exceeds the {available} tokens in the dataset")
    for name, value in (("batch_size_prompts", batch_size_prompts), ("rows_per_shard", rows_per_shard)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        if _reusable(out, hooks, model_name, context_size, n_tokens):
            return {h: ActivationCache.load(out, h) for h in hooks}
        if any(out.iterdir()):
            raise FileExistsError(f"{out} exists and holds something else; pass overwrite=True")
    if out.exists():
        shutil.rmtree(out)
    widths = {h: hook_width(model, h) for h in hooks}
    n_rows = n_tokens // context_size
    features = Features(
        {
            **{h: Array2D(shape=(context_size, widths[h]), dtype=dtype) for h in hooks},
            "token_ids": ArrowList(Value(dtype="int32"), length=context_size),
        }
    )
    stops = [extract_stop_at_layer_from_tlens_hook_name(h) for h in hooks]
    stop_at_layer = None if any(s is None for s in stops) else max(s for s in stops if s is not None)
    tmp = out / ".shards"
    tmp.mkdir(parents=True)
    shard: dict[str, list[torch.Tensor]] = {h: [] for h in [*hooks, "token_ids"]}
    shard_paths: list[str] = []

    def flush() -> None:
        if not shard["token_ids"]:
            return
        data = {k: torch.cat(v).numpy() for k, v in shard.items()}
        path = str(tmp / f"shard_{len(shard_paths):05d}")
        Dataset.from_dict(data, features=features).save_to_disk(path)
        shard_paths.append(path)
        for v in shard.values():
            v.clear()

    input_ids = torch.as_tensor(token_dataset[:n_rows]["input_ids"], dtype=torch.long)
    device = input_device(model)  # a TransformerBridge does not move its inputs
    kwargs = {} if stop_at_layer is None else {"stop_at_layer": stop_at_layer}
    with torch.no_grad():
        for start in tqdm(range(0, n_rows, batch_size_prompts), desc=f"capture {len(hooks)} hook(s)", unit="batch"):
            toks = input_ids[start : start + batch_size_prompts]
            _, cache = model.run_with_cache(toks.to(device), names_filter=hooks, prepend_bos=False, **kwargs)
            for h in hooks:
                # float16 storage: go through float32 so bfloat16 models round once
                shard[h].append(cache[h].detach().float().to(np_dtype).cpu())
            shard["token_ids"].append(toks.to(torch.int32))
            if sum(t.shape[0] for t in shard["token_ids"]) >= rows_per_shard:
                flush()
        flush()
    data_dir = out
    concatenate_datasets([Dataset.load_from_disk(p) for p in shard_paths]).save_to_disk(str(data_dir))
    shutil.rmtree(tmp)
    info = {
        "path": str(out),
        "hook_names": hooks,
        "d_ins": widths,
        "context_size": context_size,
        "n_tokens": n_rows * context_size,
        "model_name": model_name,
        "dtype": dtype,
    }
    (out / CACHE_INFO).write_text(json.dumps(info, indent=2))
    return {h: ActivationCache.load(out, h) for h in hooks}


def convert_capture(cache: ActivationCache, out_dir: str | Path, dtype: str) -> ActivationCache:
    """Store ``cache``'s hook (and the token ids) again at ``out_dir`` in storage type ``dtype``.

    The values are what :func:`capture_hooks` with that ``dtype`` stores (each float32 activation
    rounded once), so the R² cost of ``float16`` storage can be measured without a second model
    pass; an existing folder at ``out_dir`` is an error.
    """
    _storage_dtype(dtype)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    ds = Dataset.load_from_disk(cache.path).select_columns([cache.hook_name, "token_ids"])
    features = ds.features.copy()
    features[cache.hook_name] = Array2D(shape=(cache.context_size, cache.d_in), dtype=dtype)
    ds.cast(features).save_to_disk(str(out))
    info = json.loads((Path(cache.path) / CACHE_INFO).read_text())
    info.update(path=str(out), hook_names=[cache.hook_name], d_ins={cache.hook_name: cache.d_in}, dtype=dtype)
    (out / CACHE_INFO).write_text(json.dumps(info, indent=2))
    return ActivationCache.load(out, cache.hook_name)


def capture_activations(
    model: Any,
    token_dataset: Dataset,
    hook_name: str,
    out_dir: str | Path,
    n_tokens: int | None = None,
    *,
    model_name: str = "model",
    batch_size_prompts: int = 8,
    dtype: str = "float32",
    overwrite: bool = False,
) -> ActivationCache:
    """:func:`capture_hooks` for one hook."""
    return capture_hooks(
        model, token_dataset, [hook_name], out_dir, n_tokens, model_name=model_name,
        batch_size_prompts=batch_size_prompts, dtype=dtype, overwrite=overwrite,
    )[hook_name]


def train_on_cache(
    sae_cfg: TrainingSAEConfig,
    cache: ActivationCache,
    model: Any,
    token_dataset: Dataset | None,
    out_dir: str | Path,
    *,
    training_tokens: int | None = None,
    train_batch_size_tokens: int = 4096,
    lr: float = 3e-4,
    seed: int = 42,
    n_batches_for_norm_estimate: int = 50,
    exclude_special_tokens: bool | list[int] = True,
    dead_feature_window: int | None = None,
    n_checkpoints: int = 0,
    lr_schedule: bool = True,
    device: str = "cpu",
    **runner_kwargs: Any,
) -> TrainingSAE:
    """Train one SAE on a stored capture with SAELens's ``SAETrainer`` under SPEC §8: special tokens
    out of every batch and of the norm estimate (``exclude_special_tokens``: the model tokenizer's
    special ids, an explicit list, or False), the dead-feature window sized to the run unless given,
    and SAELens's lr warm-up/decay fields set by :func:`sae_ext.protocol.lr_schedule` unless
    ``runner_kwargs`` set a schedule or ``lr_schedule`` is False (constant lr).

    The run is configured as a ``LanguageModelSAERunnerConfig`` (``runner_kwargs`` are its fields:
    ``lr_warm_up_steps``, ``lr_decay_steps``, ``lr_end``, …) and trained by SAELens's trainer; the
    activations come from memory (:class:`sae_ext.cache_stream.CachedActivationBatches`, shuffled
    over the whole capture) instead of SAELens's cached-dataset reader, which is ~25× slower on CPU.
    ``device`` is SAELens's training device (the stored activations are moved there once).
    ``model`` supplies the special ids; ``token_dataset`` is not read (kept for callers of the
    runner-based version). The SAE is saved to ``out_dir`` as the runner saves it (inference format,
    runner config, feature sparsity; loadable with ``SAE.load_from_disk`` after ``import sae_ext``).
    ``n_checkpoints`` evenly spaced mid-run checkpoints (SAELens's own) are kept as
    ``out_dir/checkpoints/<tokens seen>``; :func:`load_checkpoint` turns one into an inference SAE.
    With a decaying lr a checkpoint is not the SAE of a shorter run: the convergence check trains
    the half-budget run itself (:func:`sae_ext.convergence.train_with_half_budget`).
    """
    del token_dataset
    if sae_cfg.d_in != cache.d_in:
        raise ValueError(f"SAE d_in ({sae_cfg.d_in}) != activation width {cache.d_in} at {cache.hook_name}")
    if isinstance(n_checkpoints, bool) or not isinstance(n_checkpoints, int) or n_checkpoints < 0:
        raise ValueError(f"n_checkpoints must be an int >= 0, got {n_checkpoints!r}")
    training_tokens = training_tokens or cache.n_tokens
    out = Path(out_dir)
    run_ckpts = out / ".checkpoints"
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
        lr=lr,
        seed=seed,
        n_batches_for_norm_estimate=n_batches_for_norm_estimate,
        device=device,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(out),
        n_checkpoints=n_checkpoints,
        checkpoint_path=str(run_ckpts) if n_checkpoints else None,
        verbose=False,
        **runner_kwargs,
    )
    apply_protocol(cfg, model, exclude_special_tokens=exclude_special_tokens, dead_window=dead_feature_window,
                   schedule=lr_schedule)
    if cfg.exclude_special_tokens is True:
        raise ValueError(
            "exclude_special_tokens=True needs the model whose tokenizer names the special ids; "
            "pass model, the ids as a list of ints, or False"
        )
    excluded = cfg.exclude_special_tokens or []
    batches = CachedActivationBatches(
        cache.path, cache.hook_name, cache.context_size, cfg.train_batch_size_tokens,
        exclude_token_ids=excluded, seed=seed, device=cfg.device,
    )
    torch.manual_seed(seed)
    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())
    _set_run_metadata(sae, cfg)

    def save_runner_cfg(checkpoint_path: Path | None) -> None:
        if checkpoint_path is not None:
            (checkpoint_path / RUNNER_CFG_FILENAME).write_text(json.dumps(cfg.to_dict()))

    trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=batches,
                         save_checkpoint_fn=save_runner_cfg)
    sae = trainer.fit()
    out.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(str(out))
    save_file({"sparsity": trainer.log_feature_sparsity}, out / SPARSITY_FILENAME)
    (out / RUNNER_CFG_FILENAME).write_text(json.dumps(cfg.to_dict()))
    (out / PROTOCOL_FILE).write_text(json.dumps({
        "training_tokens": cfg.training_tokens,
        "train_batch_size_tokens": cfg.train_batch_size_tokens,
        "dead_feature_window": cfg.dead_feature_window,
        "lr_warm_up_steps": cfg.lr_warm_up_steps,
        "lr_decay_steps": cfg.lr_decay_steps,
        "lr_end": cfg.lr_end,
        "exclude_special_tokens": cfg.exclude_special_tokens,
        "tokens_after_filter": batches.n_tokens,
        "epochs": batches.epochs,
        "lr": cfg.lr,
        "seed": seed,
    }, indent=2))
    if n_checkpoints:
        kept = out / CHECKPOINTS_DIR
        if kept.exists():
            shutil.rmtree(kept)
        kept.mkdir()
        for weights in list(run_ckpts.rglob(SAE_WEIGHTS_FILENAME)):
            shutil.move(str(weights.parent), kept / weights.parent.name)
        shutil.rmtree(run_ckpts)
    return sae


#: The runner-config fields SAELens's runner copies into an SAE's metadata before training.
_RUN_METADATA_FIELDS = (
    "dataset_path", "hook_name", "model_name", "model_class_name", "hook_head_index", "context_size",
    "seqpos_slice", "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens",
    "sequence_separator_token", "disable_concat_sequences",
)


def _set_run_metadata(sae: TrainingSAE, cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """The metadata SAELens's runner records on an SAE it trains (hook, model, context, filter)."""
    for name in _RUN_METADATA_FIELDS:
        setattr(sae.cfg.metadata, name, getattr(cfg, name))


def checkpoint_dirs(out_dir: str | Path) -> dict[int, Path]:
    """The mid-run checkpoints a ``train_on_cache(..., n_checkpoints=N)`` run kept, by tokens seen."""
    kept = Path(out_dir) / CHECKPOINTS_DIR
    if not kept.is_dir():
        return {}
    return dict(sorted((int(p.name), p) for p in kept.iterdir() if (p / SAE_WEIGHTS_FILENAME).is_file()))


def load_checkpoint(checkpoint_dir: str | Path, device: str = "cpu") -> SAE[Any]:
    """The inference SAE of one mid-run checkpoint (see :func:`checkpoint_dirs`).

    A checkpoint holds the training SAE in SAELens's normalised units and the activation scaler;
    the scaling factor is folded in and the training SAE converted to its inference architecture
    as SAELens does at the end of a run (BatchTopK becomes JumpReLU with the threshold reached so far).
    """
    import tempfile

    ckpt = Path(checkpoint_dir)
    if not (ckpt / SAE_WEIGHTS_FILENAME).is_file():
        raise FileNotFoundError(f"{ckpt} is not a training checkpoint (no {SAE_WEIGHTS_FILENAME})")
    sae = TrainingSAE.load_from_disk(ckpt, device=device)
    scaler = ActivationScaler()
    scaler.load(ckpt / ACTIVATION_SCALER_CFG_FILENAME)
    if scaler.scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=device)
