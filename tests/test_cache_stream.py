"""The in-memory data provider: same values as SAELens's reader, special ids out, full shuffles."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from datasets import Dataset

from sae_ext.cache_stream import CachedActivationBatches, read_cached_column
from sae_ext.capture import capture_hooks
from sae_ext.testing import random_token_dataset, tiny_hooked_transformer

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    model = tiny_hooked_transformer()
    rows = random_token_dataset(n_rows=20, context_size=16)
    out = tmp_path_factory.mktemp("c") / "cap"
    capture_hooks(model, rows, HOOKS, out, rows_per_shard=6)  # several shards: chunked Arrow columns
    return out


@pytest.mark.parametrize("hook", HOOKS)
def test_read_matches_the_datasets_reader(capture, hook) -> None:
    ref = Dataset.load_from_disk(str(capture)).with_format("torch")
    x = read_cached_column(capture, hook, 16)
    assert x.shape == (320, 32)
    assert torch.equal(x, ref[:][hook].reshape(-1, 32))
    ids = read_cached_column(capture, "token_ids", 16)
    assert torch.equal(ids.long(), ref[:]["token_ids"].reshape(-1).long())
    assert torch.equal(read_cached_column(capture, hook, 16, max_tokens=37), x[:37])
    with pytest.raises(ValueError, match="no column 'nope'"):
        read_cached_column(capture, "nope", 16)


def test_batches_drop_excluded_ids_and_cover_every_kept_token(capture) -> None:
    x = read_cached_column(capture, HOOKS[0], 16)
    ids = read_cached_column(capture, "token_ids", 16).long()
    excluded = ids[:3].tolist()
    kept = x[~torch.isin(ids, torch.tensor(excluded))]
    batches = CachedActivationBatches(capture, HOOKS[0], 16, 50, exclude_token_ids=excluded, seed=3)
    assert batches.n_tokens == kept.shape[0] < 320
    epoch = torch.cat([next(batches) for _ in range(batches.n_tokens // 50)])
    assert epoch.dtype == torch.float32 and epoch.shape[1] == 32
    # one epoch is a permutation of the kept rows: no excluded row, no repeats
    ref = Counter(tuple(r.tolist()) for r in kept)
    got = Counter(tuple(r.tolist()) for r in epoch)
    assert not got - ref and not set(got) & {tuple(r.tolist()) for r in x[torch.isin(ids, torch.tensor(excluded))]}
    more = [next(batches) for _ in range(10)]  # crosses epochs; every batch stays full
    assert all(b.shape == (50, 32) for b in more) and batches.epochs >= 2
    same = CachedActivationBatches(capture, HOOKS[0], 16, 50, exclude_token_ids=excluded, seed=3)
    assert torch.equal(next(same), epoch[:50])  # seeded


def test_bad_settings_fail_before_reading(capture) -> None:
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            CachedActivationBatches(capture, HOOKS[0], 16, bad)
    with pytest.raises(ValueError, match="fewer than one batch"):
        CachedActivationBatches(capture, HOOKS[0], 16, 1000)


def test_float16_copy_rounds_each_value_once(capture, tmp_path) -> None:
    from sae_ext.capture import ActivationCache, convert_capture

    cache = ActivationCache.load(capture, HOOKS[1])
    half = convert_capture(cache, tmp_path / "f16", "float16")
    assert half.hook_name == HOOKS[1] and half.n_tokens == cache.n_tokens
    assert read_cached_column(half.path, HOOKS[1], 16).dtype == torch.float16
    assert torch.equal(half.activations(), cache.activations().half().float())
    assert torch.equal(half.token_ids(), cache.token_ids())
    with pytest.raises(FileExistsError):
        convert_capture(cache, tmp_path / "f16", "float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_capture(cache, tmp_path / "b", "bfloat16")
    assert not (tmp_path / "b").exists()
