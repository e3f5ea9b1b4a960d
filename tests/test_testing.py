"""`sae_ext.testing`: the offline fixtures the tests, tutorials and benchmarks share."""

from collections.abc import Iterator

import pytest
import torch
from sae_lens.registry import get_sae_training_class

from sae_ext.testing import fit_on_stream, small_training_config


def _stream(batch: int, d_in: int = 16) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(batch, d_in, generator=g)


def test_fit_on_stream_runs_the_requested_steps_and_changes_the_weights() -> None:
    torch.manual_seed(0)
    sae = get_sae_training_class("topk")[0](small_training_config("topk", d_in=16, d_sae=32))
    before = sae.W_enc.detach().clone()
    taken = 0

    def counted() -> Iterator[torch.Tensor]:
        nonlocal taken
        for b in _stream(8):
            taken += 1
            yield b

    assert fit_on_stream(sae, counted(), steps=5, batch_size=8) is sae
    assert taken == 5  # one batch per step: the trainer ran exactly the requested steps
    assert not torch.allclose(before, sae.W_enc)


@pytest.mark.parametrize(
    "bad", [{"steps": 0}, {"steps": 2.5}, {"batch_size": -1}, {"lr": float("nan")}, {"lr": 0.0}]
)
def test_fit_on_stream_rejects_impossible_settings_before_training(bad: dict) -> None:
    sae = get_sae_training_class("topk")[0](small_training_config("topk", d_in=16, d_sae=32))
    before = sae.W_enc.detach().clone()
    kwargs = {"steps": 2, "batch_size": 8, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        fit_on_stream(sae, _stream(8), **kwargs)
    assert torch.equal(before, sae.W_enc)
