"""Voting rules pinned on small hand-made probability tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgclf.ensemble import (
    VOTE_METHODS,
    EnsembleError,
    hard_vote,
    soft_vote,
    vote,
    vote_shares,
    weighted_vote,
)
from imgclf.errors import UserError

NUM_CLASSES = 4


def one_hot_votes(*labels_per_model: list[int]) -> np.ndarray:
    """(models, N, C) probabilities whose top-1 labels are the given ones (0.7 on top)."""
    models = []
    for labels in labels_per_model:
        probs = np.full((len(labels), NUM_CLASSES), 0.1, dtype=np.float32)
        probs[np.arange(len(labels)), labels] = 0.7
        models.append(probs)
    return np.stack(models)


# ---------------------------------------------------------------------------- hard vote


def test_unanimous():
    probs = one_hot_votes([0, 3], [0, 3], [0, 3])
    assert hard_vote(probs).tolist() == [0, 3]


def test_two_against_one_majority_wins_whoever_is_preferred():
    # sample 0: models 1 and 2 outvote model 0; sample 1: models 0 and 2 outvote model 1
    probs = one_hot_votes([1, 2], [0, 3], [0, 2])
    assert hard_vote(probs).tolist() == [0, 2]
    assert hard_vote(probs, prefer_order=[0, 1, 2]).tolist() == [0, 2]
    assert hard_vote(probs, prefer_order=[1, 0, 2]).tolist() == [0, 2]


def test_three_different_preferred_model_decides():
    probs = one_hot_votes([0], [1], [2])
    assert hard_vote(probs).tolist() == [0]  # default order: model 0 first
    assert hard_vote(probs, prefer_order=[2, 0, 1]).tolist() == [2]
    assert hard_vote(probs, prefer_order=[1, 2, 0]).tolist() == [1]
    assert hard_vote(probs, prefer_order=[1]).tolist() == [1]  # partial order: 1, then 0, 2


def test_four_models_two_two_tie_goes_to_earliest_preferred_voter():
    # models 0,2 vote 1; models 1,3 vote 2
    probs = one_hot_votes([1], [2], [1], [2])
    assert hard_vote(probs).tolist() == [1]
    assert hard_vote(probs, prefer_order=[3, 0, 1, 2]).tolist() == [2]
    assert hard_vote(probs, prefer_order=[2, 1, 0, 3]).tolist() == [1]


def test_four_models_all_different():
    probs = one_hot_votes([3], [1], [0], [2])
    assert hard_vote(probs).tolist() == [3]
    assert hard_vote(probs, prefer_order=[2, 3, 1, 0]).tolist() == [0]


def test_four_models_preferred_in_minority_majority_still_wins():
    # 2-1-1: models 1,2 vote 3; model 0 votes 0; model 3 votes 1
    probs = one_hot_votes([0], [3], [3], [1])
    assert hard_vote(probs).tolist() == [3]
    assert hard_vote(probs, prefer_order=[0, 3, 1, 2]).tolist() == [3]


def test_hard_vote_takes_lists_and_tensors():
    table = one_hot_votes([0, 1], [2, 1], [2, 0])
    as_list = [table[0], table[1], table[2]]
    as_tensors = [torch.from_numpy(p) for p in table]
    assert hard_vote(as_list).tolist() == [2, 1]
    assert hard_vote(as_tensors).tolist() == [2, 1]


def test_hard_vote_rows_are_independent_on_a_large_batch():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 20_000, 10)).astype(np.float32)
    top = probs.argmax(axis=2)
    labels = hard_vote(probs, prefer_order=[2, 0, 1])
    all_differ = (top[0] != top[1]) & (top[1] != top[2]) & (top[0] != top[2])
    assert (labels[all_differ] == top[2][all_differ]).all()  # preferred model decides
    majority = (top[0] == top[1]) & ~all_differ
    assert (labels[majority] == top[0][majority]).all()


def test_prefer_order_must_name_distinct_existing_models():
    probs = one_hot_votes([0], [1], [2])
    with pytest.raises(ValueError, match="prefer_order"):
        hard_vote(probs, prefer_order=[0, 0, 1])
    with pytest.raises(ValueError, match="prefer_order"):
        hard_vote(probs, prefer_order=[3])


def test_vote_shares():
    probs = one_hot_votes([0, 1], [0, 2], [1, 2], [0, 2])
    np.testing.assert_allclose(
        vote_shares(probs), [[0.75, 0.25, 0, 0], [0, 0.25, 0.75, 0]], atol=1e-6
    )


# ---------------------------------------------------------------------------- soft vote


def test_soft_and_hard_disagree_on_a_crafted_table():
    # Two lukewarm votes for class 0 against one very confident vote for class 1:
    # hard voting counts heads (0), soft voting weighs confidence (mean 0.633 for class 1).
    probs = np.array(
        [
            [[0.55, 0.45, 0.0]],
            [[0.55, 0.45, 0.0]],
            [[0.00, 1.00, 0.0]],
        ]
    )
    assert hard_vote(probs).tolist() == [0]
    labels, mean_probs = soft_vote(probs)
    assert labels.tolist() == [1]
    np.testing.assert_allclose(mean_probs, [[1.1 / 3, 1.9 / 3, 0.0]])


# ---------------------------------------------------------------------------- weighted vote


def test_weighted_vote_weights_are_normalized():
    probs = np.array(
        [
            [[0.9, 0.1]],
            [[0.2, 0.8]],
        ]
    )
    labels, mixed = weighted_vote(probs, [1, 3])  # 0.25*model0 + 0.75*model1
    assert labels.tolist() == [1]
    np.testing.assert_allclose(mixed, [[0.375, 0.625]])
    labels, mixed = weighted_vote(probs, [3, 1])
    assert labels.tolist() == [0]
    np.testing.assert_allclose(mixed, [[0.725, 0.275]])
    # zero weight drops a model entirely
    labels, mixed = weighted_vote(probs, [0, 2])
    np.testing.assert_allclose(mixed, probs[1])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([0, 0], "all zero"),
        ([1, -1], "non-negative"),
        ([1, float("nan")], "finite"),
        ([1, 1, 1], "3 weights for 2 models"),
    ],
)
def test_weighted_vote_rejects_bad_weights(weights, message):
    probs = np.full((2, 1, 2), 0.5)
    with pytest.raises(ValueError, match=message):
        weighted_vote(probs, weights)


# ---------------------------------------------------------------------------- dispatch


def test_vote_dispatch_matches_direct_calls():
    probs = one_hot_votes([0, 1], [2, 1], [2, 3])
    labels, shares = vote("hard", probs, prefer_order=[1])
    assert labels.tolist() == hard_vote(probs, prefer_order=[1]).tolist()
    np.testing.assert_allclose(shares, vote_shares(probs))
    for method, direct in (
        ("soft", soft_vote(probs)),
        ("weighted", weighted_vote(probs, [1, 2, 3])),
    ):
        got = vote(method, probs, weights=[1, 2, 3] if method == "weighted" else None)
        assert got[0].tolist() == direct[0].tolist()
        np.testing.assert_allclose(got[1], direct[1])


def test_unknown_method_is_a_user_error_listing_choices():
    with pytest.raises(UserError, match="hard, soft, weighted") as info:
        vote("median", one_hot_votes([0]))
    assert "'median'" in str(info.value)
    assert set(VOTE_METHODS) == {"hard", "soft", "weighted"}


def test_options_that_do_not_apply_are_rejected():
    probs = one_hot_votes([0], [1])
    with pytest.raises(EnsembleError, match="weights does not apply"):
        vote("soft", probs, weights=[1, 1])
    with pytest.raises(EnsembleError, match="prefer_order does not apply"):
        vote("weighted", probs, prefer_order=[1], weights=[1, 1])
    with pytest.raises(EnsembleError, match="needs one weight per model"):
        vote("weighted", probs)
