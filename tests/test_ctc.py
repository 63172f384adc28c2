"""CTC loss against independent computations: brute-force alignment sums,
one-at-a-time evaluation, and central finite differences."""
import itertools

import numpy as np
import pytest

from iam_handwriting import BLANK, ctc_log_likelihood, ctc_loss
from conftest import log_softmax


def collapse(path):
    """CTC's many-to-one map: merge repeats, then drop blanks."""
    out, prev = [], None
    for k in path:
        if k != prev and k != BLANK:
            out.append(k)
        prev = k
    return out


def brute_force_nll(lp, labels):
    """-log of the summed probability of every length-T path that collapses to labels."""
    T, K = lp.shape
    logs = [lp[np.arange(T), path].sum() for path in itertools.product(range(K), repeat=T)
            if collapse(path) == list(labels)]
    return -np.logaddexp.reduce(logs) if logs else np.inf


TINY_CASES = [
    (1, 3, []),
    (1, 3, [2]),
    (3, 3, []),
    (4, 3, [1, 2]),
    (5, 3, [1, 1]),  # repeat: needs a blank between the two 1s
    (3, 3, [1, 1]),  # exactly the minimum length for a repeat
    (6, 3, [2, 1, 2]),
    (5, 4, [2, 2, 3]),
    (6, 4, [3, 3, 3]),
    (6, 2, [1, 1]),  # K = 2: a single letter
    (2, 3, [1, 1]),  # impossible: a repeat needs 3 steps
]


@pytest.mark.parametrize("T,K,labels", TINY_CASES)
def test_ctc_nll_equals_brute_force_sum_over_alignments(T, K, labels):
    rng = np.random.default_rng(T * 100 + K * 10 + len(labels))
    lp = log_softmax(rng.normal(size=(T, 1, K)) * 2)
    nll, _ = ctc_loss(lp, [T], [labels])
    expected = brute_force_nll(lp[:, 0], labels)
    if np.isinf(expected):
        assert np.isinf(nll[0]) and nll[0] > 0
    else:
        np.testing.assert_allclose(nll[0], expected, rtol=1e-12)
    np.testing.assert_allclose(-ctc_log_likelihood(lp, [T], [labels]), nll)


def test_brute_force_reference_is_not_trivially_agreeable():
    """The reference distinguishes labelings: a wrong label gives a different sum."""
    rng = np.random.default_rng(0)
    lp = log_softmax(rng.normal(size=(5, 1, 3)) * 2)
    assert not np.isclose(brute_force_nll(lp[:, 0], [1, 2]), brute_force_nll(lp[:, 0], [2, 1]))
    # and summing over every labeling gives probability one
    total = np.logaddexp.reduce([-brute_force_nll(lp[:, 0], list(y))
                                 for n in range(6) for y in itertools.product([1, 2], repeat=n)
                                 if np.isfinite(brute_force_nll(lp[:, 0], list(y)))])
    np.testing.assert_allclose(total, 0.0, atol=1e-12)


def random_batch(rng, B=5, T=9, K=5):
    lengths = rng.integers(4, T + 1, size=B)
    lengths[0] = T
    targets = [list(rng.integers(1, K, size=rng.integers(0, 4))) for _ in range(B)]
    targets[1] = [2, 2]  # a repeat
    targets[2] = []  # an empty target
    lp = log_softmax(rng.normal(size=(T, B, K)) * 1.5)
    return lp, lengths, targets


def test_batched_ctc_equals_one_sequence_at_a_time():
    rng = np.random.default_rng(1)
    lp, lengths, targets = random_batch(rng)
    nll, grad = ctc_loss(lp, lengths, targets)
    for b, (n, y) in enumerate(zip(lengths, targets)):
        nll_b, grad_b = ctc_loss(lp[:n, b:b + 1], [n], [y])
        np.testing.assert_allclose(nll[b], nll_b[0], rtol=1e-12)
        np.testing.assert_allclose(grad[:n, b], grad_b[:, 0], atol=1e-12)
        assert np.all(grad[n:, b] == 0.0)


def test_ctc_gradient_equals_central_finite_differences():
    rng = np.random.default_rng(2)
    lp, lengths, targets = random_batch(rng, B=4, T=7, K=4)
    logits = lp + rng.normal(size=(1, 4, 1))  # log_softmax is shift-invariant per row

    def loss(z):
        return ctc_loss(log_softmax(z), lengths, targets)[0].sum()

    _, grad = ctc_loss(log_softmax(logits), lengths, targets)
    numeric = np.zeros_like(logits)
    eps = 1e-6
    for idx in np.ndindex(logits.shape):
        z = logits.copy()
        z[idx] += eps
        up = loss(z)
        z[idx] -= 2 * eps
        numeric[idx] = (up - loss(z)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)
    assert np.abs(numeric).max() > 0.1  # the check compares something non-trivial


def test_impossible_alignment_gives_inf_and_zero_gradient_without_touching_others():
    rng = np.random.default_rng(3)
    lp = log_softmax(rng.normal(size=(6, 3, 4)))
    lengths = [2, 6, 3]
    targets = [[1, 1], [1, 2], [3, 3, 3]]  # 0: a repeat needs 3 steps, has 2; 2: needs 5, has 3
    with np.errstate(all="raise"):
        nll, grad = ctc_loss(lp, lengths, targets)
    assert np.isposinf(nll[0]) and np.isposinf(nll[2])
    assert np.all(grad[:, 0] == 0) and np.all(grad[:, 2] == 0)
    assert np.all(np.isfinite(grad))
    alone, alone_grad = ctc_loss(lp[:, 1:2], [6], [[1, 2]])
    np.testing.assert_allclose(nll[1], alone[0], rtol=1e-12)
    np.testing.assert_allclose(grad[:, 1], alone_grad[:, 0], atol=1e-12)


def test_long_sequences_stay_finite_and_posteriors_sum_to_one():
    rng = np.random.default_rng(4)
    T, L, K = 2000, 300, 11
    lp = log_softmax(rng.normal(size=(T, 2, K)) * 3)
    targets = [list(rng.integers(1, K, size=L)), list(rng.integers(1, 3, size=L))]  # second: many repeats
    with np.errstate(over="raise", invalid="raise"):
        nll, grad = ctc_loss(lp, [T, T - 7], targets)
    assert np.all(np.isfinite(nll)) and np.all(nll > 0)
    assert np.all(np.isfinite(grad))
    # softmax rows and posterior rows both sum to one, so gradient rows sum to zero
    np.testing.assert_allclose(grad.sum(axis=-1), 0.0, atol=1e-9)


def test_time_and_label_reversal_leaves_the_likelihood_unchanged():
    """The backward variables are computed from this symmetry; check it directly."""
    rng = np.random.default_rng(5)
    lp, lengths, targets = random_batch(rng)
    nll = ctc_loss(lp, lengths, targets)[0]
    for b, (n, y) in enumerate(zip(lengths, targets)):
        reversed_nll = ctc_loss(lp[:n, b:b + 1][::-1], [n], [y[::-1]])[0]
        np.testing.assert_allclose(nll[b], reversed_nll[0], rtol=1e-12)


@pytest.mark.parametrize("lengths,targets,message", [
    ([4], [[0, 1]], "target labels"),
    ([4], [[1, 5]], "target labels"),
    ([5], [[1]], "input lengths"),
    ([0], [[1]], "input lengths"),
    ([4, 4], [[1]], "need"),
])
def test_bad_ctc_inputs_raise_value_error(lengths, targets, message):
    lp = log_softmax(np.zeros((4, len(lengths) if len(lengths) == len(targets) else 1, 5)))
    with pytest.raises(ValueError, match=message):
        ctc_loss(lp, lengths, targets)
