"""Recovery metrics against ground-truth subspaces, on hand-built geometry."""

from __future__ import annotations

import math

import pytest
import torch

from sae_ext.synthetic.recovery import (
    best_matching_groups,
    dominant_subspace,
    energy_in_subspace,
    max_cosine_match,
    principal_cosines,
    splitting_count,
    subspace_capture,
    units_for_energy,
)

E = torch.eye(6, dtype=torch.float64)


def test_principal_cosines_known_angles() -> None:
    theta = 0.3
    tilted = math.cos(theta) * E[1] + math.sin(theta) * E[2]
    cos = principal_cosines(torch.stack([E[0], E[1]]), torch.stack([E[0], tilted]))
    torch.testing.assert_close(cos, torch.tensor([1.0, math.cos(theta)], dtype=torch.float64))
    # identical spans given by different, non-orthonormal rows
    a = torch.stack([E[0] + E[1], 2 * E[1]])
    b = torch.stack([E[0], E[1] - E[0]])
    torch.testing.assert_close(principal_cosines(a, b), torch.ones(2, dtype=torch.float64))
    # orthogonal spans
    torch.testing.assert_close(
        principal_cosines(E[:2], E[2:4]), torch.zeros(2, dtype=torch.float64)
    )
    # rank-deficient rows count once; lengths are min(rank a, rank b)
    assert principal_cosines(torch.stack([E[0], 3 * E[0]]), E[:3]).tolist() == [1.0]


def test_principal_cosines_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match="same d"):
        principal_cosines(torch.zeros(2, 3), torch.zeros(2, 4))


def test_splitting_count_for_single_direction_latents() -> None:
    circle = torch.stack([E[0], E[1]])  # a 2-D feature
    line = E[2:3]  # a 1-D feature
    latents = torch.stack(
        [
            E[0],
            (E[0] + E[1]) / math.sqrt(2),
            -E[1],  # the opposite direction lies inside the subspace too
            0.95 * E[0] + math.sqrt(1 - 0.95**2) * E[3],  # cos 0.95 to the circle: inside
            0.85 * E[1] + math.sqrt(1 - 0.85**2) * E[3],  # cos 0.85: outside
            E[2],
            0.8 * E[2] + 0.6 * E[4],  # cos 0.8 to the line: outside
        ]
    )
    assert splitting_count([circle, line], latents).tolist() == [4, 1]
    assert splitting_count([circle, line], latents, cos_threshold=0.8).tolist() == [5, 2]


def test_splitting_count_for_groups_uses_dominant_subspace() -> None:
    circle = torch.stack([E[0], E[1]])
    line = E[2:3]
    groups = [
        torch.stack([E[0], E[1], (E[0] + E[1]) / math.sqrt(2), E[0]]),  # rank 2 inside the circle
        torch.stack([E[2], E[2], -E[2], E[2]]),  # rank 1 on the line
        torch.stack([E[2], E[2], E[2], E[5]]),  # σ² = 3, 1: rank90 = 2 > dim(line): outside
        torch.stack([E[0], E[1], E[2], E[3]]),  # spans four dims: inside nothing
    ]
    assert splitting_count([circle, line], groups).tolist() == [1, 1]
    # with a 70 % energy cut the third group's dominant direction is E[2]: it counts
    assert splitting_count([circle, line], groups, energy=0.7).tolist() == [1, 2]
    # the stacked (K, r, d) form gives the same answer
    assert splitting_count([circle, line], torch.stack(groups)).tolist() == [1, 1]
    assert dominant_subspace(groups[2]).shape == (2, 6)


def test_subspace_capture_and_best_matching_group() -> None:
    sphere = E[:3]
    assert subspace_capture(sphere, E[:2]) == pytest.approx(2 / 3)
    assert subspace_capture(sphere, E[:4]) == pytest.approx(1.0)
    assert subspace_capture(E[4:5], E[:4]) == pytest.approx(0.0)
    groups = torch.stack([E[[0, 1, 4, 5]], E[[0, 1, 2, 5]], E[[3, 3, 3, 3]]])
    match = best_matching_groups([sphere, E[3:4]], groups)
    assert match.index.tolist() == [1, 2]
    torch.testing.assert_close(match.capture, torch.ones(2, dtype=torch.float64))


def test_energy_attribution_counts_units_that_carry_a_feature() -> None:
    # a circle in span(e0, e1); unit 0 is one group carrying all of it, units 1-2 are latents
    # that carry pieces, unit 3 lives elsewhere
    blocks = torch.zeros(4, 2, 6, dtype=torch.float64)
    blocks[0] = E[:2]
    blocks[1, 0] = E[0]
    blocks[2, 0] = E[1]
    blocks[3, 0] = E[4]
    t = torch.linspace(0, 2 * math.pi, 9, dtype=torch.float64)[:-1]
    codes = torch.zeros(8, 4, 2, dtype=torch.float64)
    codes[:, 0, 0], codes[:, 0, 1] = t.cos(), t.sin()
    energy = energy_in_subspace(codes, blocks, E[:2])
    torch.testing.assert_close(energy, torch.tensor([8.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert units_for_energy(energy) == 1
    # the same circle split over the two latents: both needed
    codes2 = torch.zeros_like(codes)
    codes2[:, 1, 0], codes2[:, 2, 0] = t.cos(), t.sin()
    codes2[:, 3, 0] = 5.0  # energy outside the subspace is ignored
    energy2 = energy_in_subspace(codes2, blocks, E[:2])
    torch.testing.assert_close(energy2, torch.tensor([0.0, 4.0, 4.0, 0.0], dtype=torch.float64))
    assert units_for_energy(energy2) == 2
    assert units_for_energy(torch.zeros(3)) == 0
    with pytest.raises(ValueError, match="matching"):
        energy_in_subspace(codes, blocks[:3], E[:2])


def test_max_cosine_match_counts_signs_and_can_be_one_to_one() -> None:
    true = torch.stack([E[0], E[1]])
    learned = torch.stack([-E[0], 0.6 * E[1] + 0.8 * E[2]])
    m = max_cosine_match(true, learned)
    torch.testing.assert_close(m.per_true, torch.tensor([1.0, 0.6], dtype=torch.float64))
    assert m.index.tolist() == [0, 1] and m.mean == pytest.approx(0.8)
    # greedy lets two true directions share a learned one; Hungarian does not
    near = torch.nn.functional.normalize(E[0] + 0.1 * E[1], dim=0)
    true2 = torch.stack([E[0], near])
    learned2 = torch.stack([E[0], E[1]])
    greedy = max_cosine_match(true2, learned2)
    assert greedy.index.tolist() == [0, 0]
    hungarian = max_cosine_match(true2, learned2, one_to_one=True)
    assert hungarian.index.tolist() == [0, 1]
    torch.testing.assert_close(
        hungarian.per_true, torch.tensor([1.0, float(near[1])], dtype=torch.float64)
    )
    # fewer learned than true: the unmatched one scores 0 with index -1
    short = max_cosine_match(true, E[:1], one_to_one=True)
    assert short.index.tolist() == [0, -1] and short.per_true.tolist() == [1.0, 0.0]
