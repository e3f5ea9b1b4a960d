"""Group (subspace) metrics on hand-built blocks with known singular values."""

from __future__ import annotations

import math

import pytest
import torch

from sae_ext.metrics.groups import (
    block_singular_values,
    dead_group_fraction,
    dead_groups_from_neuron_mask,
    group_firing_counts,
    rank90,
    rank_at_fraction,
    stable_rank,
)


def _block(singular_values: list[float], d: int = 6, seed: int = 0) -> torch.Tensor:
    """An (r, d) block with the given singular values and random orthonormal singular vectors."""
    g = torch.Generator().manual_seed(seed)
    r = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def test_singular_values_of_hand_built_blocks() -> None:
    blocks = torch.stack([_block([3.0, 1.0, 0.5]), _block([2.0, 2.0, 0.0], seed=1)])
    sv = block_singular_values(blocks)
    assert sv.shape == (2, 3) and sv.dtype == torch.float64
    torch.testing.assert_close(
        sv, torch.tensor([[3.0, 1.0, 0.5], [2.0, 2.0, 0.0]], dtype=torch.float64)
    )


def test_stable_rank_exact_values() -> None:
    e = torch.eye(4)
    blocks = torch.stack(
        [
            e[:3],  # orthonormal rows: σ = 1,1,1 -> 3
            torch.stack([e[0], -e[0], e[0]]),  # one direction (signs ignored) -> 1
            torch.stack([3 * e[0], e[1], 0 * e[2]]),  # σ = 3,1,0 -> 10/9
        ]
    )
    torch.testing.assert_close(
        stable_rank(blocks), torch.tensor([3.0, 1.0, 10.0 / 9.0], dtype=torch.float64)
    )


def test_stable_rank_is_in_one_to_r_and_rotation_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(50, 5, 16, generator=g)
    sr = stable_rank(blocks)
    assert (sr >= 1 - 1e-12).all() and (sr <= 5 + 1e-12).all()
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    torch.testing.assert_close(stable_rank(blocks @ q), sr, rtol=1e-5, atol=0)


def test_stable_rank_of_zero_block_is_nan() -> None:
    assert torch.isnan(stable_rank(torch.zeros(1, 3, 4))).all()


@pytest.mark.parametrize(
    ("sigma_sq", "expected"),
    [
        ([9.0, 1.0], 1),  # exactly 90 % in the first: 1 (the boundary counts)
        ([8.0, 2.0], 2),  # 80 % < 90 %
        ([1.0, 1.0, 1.0, 1.0], 4),  # 75 % after three
        ([50.0, 40.0, 10.0], 2),  # exactly 90 % after two
        ([50.0, 39.0, 11.0], 3),  # 89 % after two
        ([1.0, 0.0, 0.0], 1),
        ([0.0, 0.0], 0),  # empty block
    ],
)
def test_rank_at_fraction_exact(sigma_sq: list[float], expected: int) -> None:
    assert int(rank_at_fraction(torch.tensor(sigma_sq, dtype=torch.float64))) == expected


def test_rank90_on_blocks_matches_singular_value_recipe() -> None:
    blocks = torch.stack(
        [
            _block([3.0, 1.0, 0.0]),  # σ² = 9, 1, 0 -> 1
            _block([2.0, 2.0, 1.0], seed=1),  # σ² = 4, 4, 1 -> 8/9 < .9 -> 3
            _block([1.0, 1.0, 0.0], seed=2),  # -> 2
        ]
    )
    assert rank90(blocks).tolist() == [1, 3, 2]
    assert rank90(blocks, fraction=0.5).tolist() == [1, 2, 1]  # 4/9 < .5


def test_rank_functions_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="K, r, d"):
        stable_rank(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="fraction"):
        rank_at_fraction(torch.ones(3), fraction=1.5)


def test_group_firing_counts_and_dead_fraction() -> None:
    # d_sae = 6, r = 2 -> groups {0,1}, {2,3}, {4,5}; three tokens
    acts = torch.tensor(
        [
            [0.0, -1.0, 0.0, 0.0, 0.0, 0.0],  # group 0 (a negative code still fires)
            [2.0, 0.5, 0.0, 0.0, 0.0, 0.0],  # group 0
            [0.0, 0.0, 0.0, 0.0, 0.0, 3.0],  # group 2
        ]
    )
    counts = group_firing_counts(acts, group_rank=2)
    assert counts.tolist() == [2.0, 0.0, 1.0]
    assert dead_group_fraction(counts) == pytest.approx(1 / 3)
    # leading dims are tokens too
    assert group_firing_counts(acts.view(3, 1, 6), group_rank=2).tolist() == [2.0, 0.0, 1.0]
    assert group_firing_counts(acts, group_rank=3).tolist() == [2.0, 1.0]
    assert dead_group_fraction(torch.tensor([0.0, 3.0, 0.0, 1.0])) == 0.5


def test_dead_groups_need_all_columns_dead() -> None:
    mask = torch.tensor([True, True, False, True, True, True])
    assert dead_groups_from_neuron_mask(mask, 2).tolist() == [True, False, True]
    assert dead_groups_from_neuron_mask(mask, 3).tolist() == [False, True]
    with pytest.raises(ValueError, match="divisible"):
        dead_groups_from_neuron_mask(mask, 4)
    with pytest.raises(ValueError, match="divisible"):
        group_firing_counts(torch.zeros(2, 6), 4)


def test_rank90_of_circle_block_is_two() -> None:
    # four unit rows spread over a plane: σ² = 2, 2 -> rank90 2, stable rank 2
    angles = torch.tensor([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4], dtype=torch.float64)
    rows = torch.zeros(4, 5, dtype=torch.float64)
    rows[:, 0], rows[:, 1] = angles.cos(), angles.sin()
    assert rank90(rows[None]).item() == 2
    torch.testing.assert_close(stable_rank(rows[None]), torch.tensor([2.0], dtype=torch.float64))
