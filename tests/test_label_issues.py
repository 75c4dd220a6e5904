"""Suspect training labels (issue #33, item 2): the confident-learning rule against a
loop written from the paper, and the folds."""

from __future__ import annotations

import numpy as np
import pytest

from imgclf.evaluate.confident import confident_issues, label_quality, thresholds
from imgclf.train.out_of_fold import cross_validate, stratified_folds

# ------------------------------------------------------------------ the rule, by hand


def _reference(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eqs. (1)-(2) of Northcutt et al. (JAIR 2021) as loops: (thresholds, issue mask)."""
    classes = probs.shape[1]
    t = np.array(
        [
            np.mean([probs[i, j] for i in range(len(labels)) if labels[i] == j])
            for j in range(classes)
        ]
    )
    issue = np.zeros(len(labels), bool)
    for i, p in enumerate(probs):
        confident = [j for j in range(classes) if p[j] >= t[j]]
        if confident:
            star = max(confident, key=lambda j: p[j])
            issue[i] = star != labels[i] and p.argmax() != labels[i]
    return t, issue


def test_confident_rule_matches_the_paper_on_random_probabilities():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(0, 1, (300, 4))
    logits[np.arange(300), labels] += 1.5  # mostly right, some not
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    found = confident_issues(probs, labels)
    t, issue = _reference(probs, labels)
    np.testing.assert_allclose(found.thresholds, t)
    assert 0 < issue.sum() < 300
    np.testing.assert_array_equal(found.issue, issue)
    assert sorted(found.ranked) == list(np.flatnonzero(issue))
    scores = probs[found.ranked, labels[found.ranked]]
    assert np.all(np.diff(scores) >= 0)  # most suspect (lowest self-confidence) first
    assert found.joint.sum() == (found.suggested >= 0).sum()


def test_a_contradicted_label_is_flagged_with_the_class_it_looks_like():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9], [0.95, 0.05]])
    labels = np.array([0, 0, 0, 1, 1, 1])  # the last one: labelled 1, looks like 0
    found = confident_issues(probs, labels)
    assert list(found.ranked) == [5] and found.suggested[5] == 0
    assert found.score[5] == pytest.approx(0.05)
    margin = label_quality(probs, labels, "normalized_margin")
    assert margin[5] == pytest.approx((0.05 - 0.95 + 1) / 2)
    # a class no image is labelled has no threshold any image can reach
    assert thresholds(probs, np.zeros(6, dtype=np.int64))[1] == np.inf


def test_folds_hold_each_class_in_equal_shares_and_are_seeded():
    labels = np.repeat([0, 1, 2], [10, 7, 25])
    fold = stratified_folds(labels, 5, seed=1)
    for c, n in zip([0, 1, 2], [10, 7, 25], strict=True):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
    assert np.array_equal(fold, stratified_folds(labels, 5, seed=1))
    assert not np.array_equal(fold, stratified_folds(labels, 5, seed=2))


def test_out_of_fold_probabilities_come_from_a_head_that_never_saw_the_row():
    """Each row's probabilities are those of a head fitted on the other folds alone, and
    a flipped label among well-separated clusters is contradicted by them."""
    import torch

    from imgclf.train.out_of_fold import fit_predict

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))
    labels = np.repeat([0, 1, 2], 10)
    x = torch.as_tensor(centres[labels] + rng.normal(0, 0.5, (30, 8)))
    noisy = labels.copy()
    noisy[4] = 2
    probs, fold = cross_validate(x, noisy, 3, folds=5)
    assert probs.shape == (30, 3) and np.allclose(probs.sum(1), 1)
    y = torch.as_tensor(noisy)
    for k in range(5):
        held = torch.as_tensor(fold == k)
        alone = fit_predict(x[~held], y[~held], x[held], 3).numpy()
        np.testing.assert_allclose(probs[fold == k], alone, atol=1e-12)
    assert probs[4].argmax() == 0 and probs[4, 2] < 0.5
    assert list(confident_issues(probs, noisy).ranked[:1]) == [4]
