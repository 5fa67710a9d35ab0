"""The action-grounding metric proven on synthetic dynamics whose answer is known."""

import numpy as np
import pytest

from dreamer4.dynamics.grounding import MOVE_CANDIDATES, action_scores, bootstrap_ci, nearest_credit, wilson_interval

# Craftax movement: 1 left, 2 right, 3 up, 4 down -> (dy, dx) of the view content
SHIFT = {0: (0, 0), 1: (0, 1), 2: (0, -1), 3: (1, 0), 4: (-1, 0)}


def _shift(frame, a):
    dy, dx = SHIFT.get(int(a), (0, 0))
    return np.roll(frame, (dy, dx), axis=(0, 1))


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    N = 400
    prev = rng.integers(0, 256, size=(N, 12, 12, 3), dtype=np.uint8)
    true_a = rng.integers(0, 17, size=N)
    nxt = np.stack([_shift(p, a) for p, a in zip(prev, true_a)])
    return prev, nxt, true_a


def _generated(prev, true_a, model):
    cols = list(MOVE_CANDIDATES)
    out = np.stack([np.stack([model(p, c) for c in cols] + [model(p, a)]) for p, a in zip(prev, true_a)])
    return out.astype(np.float32) / 255.0


def test_a_model_that_shifts_by_the_action_identifies_every_movement(world):
    prev, nxt, true_a = world
    s = action_scores(_generated(prev, true_a, _shift), nxt / 255.0, prev, nxt, true_a)
    assert s["n_movement_changed"] == int(np.isin(true_a, (1, 2, 3, 4)).sum())
    assert s["identification_movement"]["accuracy"] == 1.0
    assert s["identification_movement"]["chance"] == pytest.approx(0.2)
    assert s["psnr_gap_true_minus_other_db_movement"]["ci95"][0] > 10  # far from zero
    # a non-movement action generates the unshifted frame, exactly like noop: the tie halves the credit
    acts = s["identification_per_action"]
    assert acts[5]["accuracy"] == pytest.approx(0.5)
    assert acts[1]["accuracy"] == 1.0


def test_a_model_that_ignores_actions_scores_chance_exactly(world):
    prev, nxt, true_a = world
    blind = lambda p, a: _shift(p, 2)  # noqa: E731 - always the same guess, whatever the action
    s = action_scores(_generated(prev, true_a, blind), nxt / 255.0, prev, nxt, true_a)
    assert s["identification_movement"]["accuracy"] == pytest.approx(0.2)
    all_ = s["identification_all"]
    assert all_["accuracy"] == pytest.approx(all_["chance"])
    assert s["psnr_gap_true_minus_other_db"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert s["nearest_share_movement"] == pytest.approx({a: 0.2 for a in MOVE_CANDIDATES})


def test_a_model_biased_to_one_candidate_scores_below_chance_and_the_share_says_why(world):
    # like untrained action inputs: every candidate's frame differs, but none under its own action
    # is right; no grounding, yet no ties either
    prev, nxt, true_a = world
    biased = lambda p, a: p if a == 0 else _shift(p, 1 + (int(a) % 4))  # noqa: E731 - a move goes the wrong way
    s = action_scores(_generated(prev, true_a, biased), nxt / 255.0, prev, nxt, true_a)
    moves = np.isin(true_a, (1, 2, 3, 4))
    assert s["identification_movement"]["accuracy"] == 0.0  # below the 20% chance
    assert s["identification_movement"]["ci95"][1] < 0.2
    # candidate a generates move 1 + (a % 4): it is exact, and wins, on the moves where that is the
    # true one; noop (unshifted) never does
    share = s["nearest_share_movement"]
    assert share[0] == 0.0 and sum(share.values()) == pytest.approx(1.0)
    for a in (1, 2, 3, 4):
        assert share[a] == pytest.approx((true_a[moves] == 1 + (a % 4)).mean())


def test_nearest_credit_splits_ties():
    err = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 3.0], [2.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    np.testing.assert_allclose(nearest_credit(err, [0, 1, 0, 2]), [1.0, 0.5, 0.0, 1 / 3])


def test_wilson_interval_worked_value():
    # 8 of 10: p = 0.8, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.716738,
    # half 1.96 sqrt(0.016 + 0.009604) / 1.38416 = 0.226582
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.490157, abs=1e-5)
    assert hi == pytest.approx(0.943320, abs=1e-5)


def test_bootstrap_ci_covers_the_mean_with_the_right_width():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=2000)
    m, lo, hi = bootstrap_ci(x)
    assert lo < m < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(2000), rel=0.15)
    assert bootstrap_ci(np.full(10, 4.0)) == (4.0, 4.0, 4.0)


def test_view_shifted_separates_a_tile_shift_from_lighting_and_sprite_changes():
    rng = np.random.default_rng(3)
    prev = rng.integers(0, 256, size=(1, 63, 63, 3), dtype=np.uint8)
    darker = (prev * 0.97).astype(np.uint8)  # daylight fading: small change everywhere
    sprite = prev.copy()
    sprite[0, 28:35, 28:35] = 255 - sprite[0, 28:35, 28:35]  # the player tile turns
    moved = np.roll(prev, 7, axis=2)  # one tile to the side
    from dreamer4.dynamics.grounding import view_shifted

    got = view_shifted(np.concatenate([prev] * 3), np.concatenate([darker, sprite, moved]))
    assert got.tolist() == [False, False, True]


def test_shift_latents_moves_map_content_opposite_to_the_player():
    from dreamer4.dynamics.grounding import shift_latents

    # 3x3 grid, 2 map rows, one channel: latent value = 10 * row + col
    z = np.array([[[10 * r + c] for r in range(3) for c in range(3)]] * 5, np.float32)  # 5, 9, 1
    out = shift_latents(z, np.array([0, 1, 2, 3, 4]), (3, 3), map_rows=2)[..., 0].reshape(5, 3, 3)
    np.testing.assert_array_equal(out[0], [[0, 1, 2], [10, 11, 12], [20, 21, 22]])  # noop: copy
    np.testing.assert_array_equal(out[1], [[0, 0, 1], [10, 10, 11], [20, 21, 22]])  # left: content right
    np.testing.assert_array_equal(out[2], [[1, 2, 2], [11, 12, 12], [20, 21, 22]])  # right: content left
    np.testing.assert_array_equal(out[3], [[0, 1, 2], [0, 1, 2], [20, 21, 22]])  # up: content down
    np.testing.assert_array_equal(out[4], [[10, 11, 12], [10, 11, 12], [20, 21, 22]])  # down: content up
