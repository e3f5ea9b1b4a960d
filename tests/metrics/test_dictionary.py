"""Dictionary statistics on hand-built latent activations with known counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sae_lens import StandardSAE

from sae_ext.evaluation_spec import EvaluationSpec
from sae_ext.metrics.dictionary import (
    DictionaryStatsAccumulator,
    dictionary_stats,
    dictionary_stats_from_codes,
)
from sae_ext.metrics.groups import rank90, stable_rank
from sae_ext.metrics.sign import bipolar_fraction


def _codes_unsigned() -> torch.Tensor:
    """20 tokens × 5 latents: latent 0 fires on all, 1 on 2 (rate 0.1, not dense: the
    threshold is strict), 2 on 3 (0.15, dense), 3 never, 4 on 1 (0.05)."""
    f = torch.zeros(20, 5)
    f[:, 0] = 1.0
    f[[3, 9], 1] = 2.0
    f[[0, 1, 2], 2] = 0.5
    f[19, 4] = 7.0
    return f


def test_exact_counts_unsigned():
    st = dictionary_stats_from_codes(_codes_unsigned(), n_bins=4)
    assert st.n_tokens == 20 and st.d_sae == 5
    assert st.l0 == pytest.approx((20 + 2 + 3 + 0 + 1) / 20)
    assert st.dead_fraction == pytest.approx(0.2) and st.n_dead == 1
    assert st.dense_fraction == pytest.approx(0.4) and st.n_dense == 2
    torch.testing.assert_close(
        st.firing_rates, torch.tensor([1.0, 0.1, 0.15, 0.0, 0.05], dtype=torch.float64)
    )
    # edges from log10(1/20) rounded down (-2) to 0; alive latents only
    assert st.hist_edges == [-2.0, -1.5, -1.0, -0.5, 0.0]
    assert st.hist_counts == [0, 1, 2, 1]
    assert st.is_signed is False
    assert st.bipolar_fraction is None and st.positive_share is None
    assert st.group_rank is None


def test_streaming_batches_give_the_same_counts():
    f = _codes_unsigned()
    acc = DictionaryStatsAccumulator(5)
    for part in (f[:7], f[7:8], f[8:].reshape(3, 4, 5)):
        acc.update(part)
    a = acc.result(n_bins=4)
    b = dictionary_stats_from_codes(f, n_bins=4)
    assert (a.l0, a.dead_fraction, a.dense_fraction, a.hist_counts) == (
        b.l0,
        b.dead_fraction,
        b.dense_fraction,
        b.hist_counts,
    )


def test_sign_statistics():
    """40 tokens: latent 0 fires 20+/20−; latent 1 39+/1− (2.5 % < 5 %); latent 2 38+/2−
    (exactly 5 %: bipolar); latent 3 dead; latent 4 only negative (4 firings)."""
    f = torch.zeros(40, 5)
    f[:20, 0], f[20:, 0] = 1.0, -1.0
    f[:39, 1], f[39, 1] = 0.3, -0.3
    f[:38, 2], f[38:, 2] = 2.0, -2.0
    f[:4, 4] = -1.0
    st = dictionary_stats_from_codes(f)
    assert st.is_signed is True
    assert st.bipolar_fraction == pytest.approx(2 / 4)
    assert st.bipolar_fraction == bipolar_fraction(f).item()  # the sign module's definition
    assert st.positive_share is not None
    ps = st.positive_share
    assert ps[0].item() == pytest.approx(0.5)
    assert ps[1].item() == pytest.approx(39 / 40)
    assert ps[2].item() == pytest.approx(38 / 40)
    assert math.isnan(ps[3].item())
    assert ps[4].item() == 0.0
    # L0 counts negative activations too (as SAELens run_evals: != 0)
    assert st.l0 == pytest.approx((40 + 40 + 40 + 0 + 4) / 40)
    # a stricter share turns latent 2 non-bipolar
    assert dictionary_stats_from_codes(f, sign_share=0.06).bipolar_fraction == pytest.approx(1 / 4)


def test_group_ranks_are_those_of_metrics_groups():
    """The group ranks of the statistics are :mod:`sae_ext.metrics.groups`'s, edge cases included."""
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    blocks = torch.stack([e1, e2, e1, 2 * e1, 3 * e1, e2, 0 * e1, 0 * e1]).view(4, 2, 4)
    st = dictionary_stats_from_codes(torch.ones(3, 8), group_rank=2, group_blocks=blocks)
    # σ² per group: [1, 1]; [5, 0]; [9, 1]; all-zero
    assert st.group_stable_rank is not None and st.group_rank90 is not None
    torch.testing.assert_close(
        st.group_stable_rank[:3], torch.tensor([2.0, 1.0, 10 / 9], dtype=torch.float64)
    )
    assert math.isnan(st.group_stable_rank[3].item())
    assert st.group_rank90.tolist() == [2, 1, 1, 0]  # [9, 1]: 9/10 reaches 90 % with one value
    torch.testing.assert_close(st.group_stable_rank, stable_rank(blocks), equal_nan=True)
    assert st.group_rank90.tolist() == rank90(blocks).tolist()
    assert st.to_dict()["groups"]["mean_stable_rank"] == pytest.approx((2 + 1 + 10 / 9) / 3)
    assert st.to_dict()["groups"]["mean_live_stable_rank"] == st.mean_group_stable_rank  # every group fired
    with pytest.raises(ValueError, match=r"group_blocks have shape \(4, 2, 4\) but the accumulator counts 2 groups"):
        dictionary_stats_from_codes(torch.ones(3, 4), group_rank=2, group_blocks=blocks)


def test_live_group_stable_rank_leaves_out_the_groups_that_never_fired():
    """Only fired groups count: used groups of ranks 1 and 2 beside a dead rank-2 one read 1.5, not 5/3."""
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    blocks = torch.stack([e1, e1, e1, e2, e1, e2]).view(3, 2, 4)  # stable ranks 1, 2, 2
    codes = torch.zeros(5, 6)
    codes[:, 0] = 1.0  # only group 0 fires, on every token
    codes[0, 3] = -2.0  # group 1 fires on one token of five
    st = dictionary_stats_from_codes(codes, group_rank=2, group_blocks=blocks)
    assert st.group_firing_rates is not None
    torch.testing.assert_close(st.group_firing_rates, torch.tensor([1.0, 0.2, 0.0], dtype=torch.float64))
    assert st.mean_group_stable_rank == pytest.approx(5 / 3)
    assert st.mean_live_group_stable_rank == pytest.approx(1.5)
    assert st.to_dict()["groups"]["mean_live_stable_rank"] == pytest.approx(1.5)
    no_blocks = dictionary_stats_from_codes(codes, group_rank=2)
    assert no_blocks.mean_live_group_stable_rank is None
    assert dictionary_stats_from_codes(torch.zeros(2, 6), group_rank=2, group_blocks=blocks
                                       ).mean_live_group_stable_rank is None  # nothing fired


def test_group_activity_counts():
    f = torch.zeros(10, 6)  # 3 groups of 2
    f[:, 0] = 1.0  # group 0 on every token
    f[:5, 3] = 1.0  # group 1 on tokens 0-4 through one latent ...
    f[:2, 2] = 1.0  # ... and on tokens 0-1 through the other too: still one active group
    st = dictionary_stats_from_codes(f, group_rank=2)
    assert st.group_l0 == pytest.approx((10 + 5) / 10)
    assert st.group_dead_fraction == pytest.approx(1 / 3)
    assert st.group_dense_fraction == pytest.approx(2 / 3)
    d = st.to_dict()["groups"]
    assert d["n_groups"] == 3 and d["group_rank"] == 2


class _GroupedSAE(StandardSAE):
    """A StandardSAE declaring groups of 2 latents whose blocks are the unit-norm decoder rows."""

    def evaluation_spec(self) -> EvaluationSpec:
        W = self.W_dec.detach().double()
        return EvaluationSpec(group_rank=2, group_blocks=(W / W.norm(dim=-1, keepdim=True)).view(-1, 2, W.shape[1]))


def test_dictionary_stats_through_a_real_sae(make_standard_sae):
    """StandardSAE with W_enc = I, b = 0: the latents are relu(x), so counts follow x."""
    d = 4
    sae = make_standard_sae(torch.eye(d), torch.zeros(d), torch.eye(d), torch.zeros(d))
    x = -torch.ones(50, d)
    x[:, 0] = 1.0  # always on
    x[:10, 1] = 2.0  # rate 0.2
    x[0, 2] = 0.5  # rate 0.02
    st = dictionary_stats(sae, x, batch_size=16, progress=False)
    torch.testing.assert_close(
        st.firing_rates, torch.tensor([1.0, 0.2, 0.02, 0.0], dtype=torch.float64)
    )
    assert st.n_dead == 1 and st.n_dense == 2 and st.is_signed is False
    # an SAE that declares groups (as SASA: consecutive latents, decoded with unit rows) gets
    # group statistics from its evaluation_spec
    grouped = _GroupedSAE(sae.cfg)
    grouped.load_state_dict(sae.state_dict())
    with torch.no_grad():
        grouped.W_dec.copy_(
            torch.stack(
                [5 * torch.eye(d)[0], torch.eye(d)[1], torch.eye(d)[2], -3 * torch.eye(d)[2]]
            )
        )
    st = dictionary_stats(grouped, [x[:20], x[20:]], progress=False)
    assert st.group_rank == 2
    torch.testing.assert_close(st.group_stable_rank, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert st.group_rank90 is not None and st.group_rank90.tolist() == [2, 1]
    assert st.group_dead_fraction == 0.0
    json.dumps(st.to_dict())  # JSON-safe


def test_validation(make_standard_sae):
    with pytest.raises(ValueError, match="feature_acts have width 3 but d_sae is 5"):
        DictionaryStatsAccumulator(5).update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="group_rank = 4 must be >= 1 and divide d_sae = 6"):
        DictionaryStatsAccumulator(6, group_rank=4)
    with pytest.raises(ValueError, match="no tokens were seen"):
        DictionaryStatsAccumulator(5).result()
    bad = torch.zeros(3, 5)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="code batch 0 contains 1 non-finite"):
        dictionary_stats_from_codes(bad)
    sae = make_standard_sae(torch.eye(4), torch.zeros(4), torch.eye(4), torch.zeros(4))
    with pytest.raises(ValueError, match="last dimension must equal sae.cfg.d_in = 4"):
        dictionary_stats(sae, torch.zeros(3, 5), progress=False)
