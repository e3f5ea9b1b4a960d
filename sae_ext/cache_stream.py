"""Serve a stored capture to SAELens's ``SAETrainer`` from memory, special tokens removed.

SAELens's ``ActivationsStore`` reads a cached-activations dataset through the ``datasets`` torch
formatter, which costs ~0.27 s per 1,024 tokens of one hook on this machine: a d_sae-1152 TopK then
trains at ~7k tokens/s, and SPEC §8's ~3 M-token budgets take most of an hour per SAE. Reading the
Arrow buffers directly loads a whole hook (700k tokens × 576) in seconds, so the capture is read
once, filtered by token id (SPEC §8) and shuffled in memory. ``SAETrainer`` is unchanged: this is
only its data provider (any ``Iterator[Tensor]`` of ``[batch, d_in]`` activations).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset


def _flat_values(column: pa.ChunkedArray, rows: int) -> np.ndarray:
    """The first ``rows`` rows of a fixed-shape list column (``Array2D`` or fixed-length
    ``Sequence``) as one flat numpy array, without the per-row Python conversion."""
    parts: list[np.ndarray] = []
    left = rows
    for chunk in column.chunks:
        if left <= 0:
            break
        chunk = chunk.slice(0, min(left, len(chunk)))
        left -= len(chunk)
        values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
            values = values.flatten()
        parts.append(values.to_numpy(zero_copy_only=False))
    return np.concatenate(parts) if parts else np.zeros(0)


def read_cached_column(
    path: str | Path, column: str, context_size: int, max_tokens: int | None = None
) -> torch.Tensor:
    """The stored ``column`` of a capture at ``path`` for its first ``max_tokens`` positions
    (default all), flattened over rows: ``[n_tokens, width]`` for a hook, ``[n_tokens]`` for
    ``token_ids``. The storage dtype is kept (``float16`` captures stay half the memory)."""
    ds = Dataset.load_from_disk(str(path))
    if column not in ds.column_names:
        raise ValueError(f"{path} has no column {column!r}; it has {ds.column_names}")
    rows = len(ds) if max_tokens is None else min(len(ds), -(-max_tokens // context_size))
    flat = torch.from_numpy(_flat_values(ds.data.column(column), rows))
    n = rows * context_size
    out = flat.reshape(n, -1) if flat.numel() != n else flat
    return out if max_tokens is None else out[:max_tokens]


class CachedActivationBatches(Iterator[torch.Tensor]):
    """Shuffled ``[batch_size, d_in]`` float32 batches of one hook of a capture, from memory.

    Positions whose token id is in ``exclude_token_ids`` are dropped once, up front (SPEC §8), so
    neither a training batch nor SAELens's norm estimate (which draws from this same iterator)
    sees them. The kept activations live on ``device`` (the trainer's), so a GPU run indexes them
    there instead of copying every batch from the host. Every epoch is a fresh permutation of the
    kept positions (seeded); an epoch's last partial batch is carried into the next one, so every
    batch has ``batch_size`` rows.
    """

    def __init__(
        self,
        path: str | Path,
        hook_name: str,
        context_size: int,
        batch_size: int,
        *,
        exclude_token_ids: Sequence[int] = (),
        max_tokens: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        acts = read_cached_column(path, hook_name, context_size, max_tokens)
        if exclude_token_ids:
            ids = read_cached_column(path, "token_ids", context_size, max_tokens).long()
            acts = acts[~torch.isin(ids, torch.as_tensor(list(exclude_token_ids), dtype=torch.long))]
        if acts.shape[0] < batch_size:
            raise ValueError(
                f"{path} holds {acts.shape[0]} usable tokens at {hook_name}, fewer than one batch ({batch_size})"
            )
        self.activations = acts.to(device)  # kept in the storage dtype; one copy on the training device
        self.batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self.epochs = 0

    @property
    def n_tokens(self) -> int:
        """Positions left after the special-token filter."""
        return int(self.activations.shape[0])

    def __iter__(self) -> CachedActivationBatches:
        return self

    def __next__(self) -> torch.Tensor:
        while self._order.numel() < self.batch_size:
            perm = torch.randperm(self.n_tokens, generator=self._generator)
            self._order = torch.cat([self._order, perm])
            self.epochs += 1
        idx, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return self.activations[idx.to(self.activations.device)].float()
