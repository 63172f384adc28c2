"""Greedy decoding, edit distance and its alignment, and the optimiser, on hand-worked cases."""
import numpy as np
import pytest

import iam_handwriting as ih
from iam_handwriting import (adam_init, adam_step, cer, clip_global_norm, edit_alignment,
                             greedy_decode, levenshtein)


def one_hot_log_probs(paths, K=4):
    """(T, B, K) log-probs whose argmax follows each path."""
    T = max(len(p) for p in paths)
    lp = np.full((T, len(paths), K), -5.0)
    for b, p in enumerate(paths):
        lp[np.arange(len(p)), b, p] = -0.01
    return lp


def test_greedy_decode_merges_repeats_then_drops_blanks():
    paths = [[0, 1, 1, 0, 1, 2, 2, 0], [3, 3, 3, 3, 3, 3, 3, 3], [0, 0, 0, 0, 0, 0, 0, 0], [2, 0, 2, 2, 1, 0, 0, 3]]
    assert greedy_decode(one_hot_log_probs(paths), [8, 8, 8, 8]) == [[1, 1, 2], [3], [], [2, 2, 1, 3]]


def test_greedy_decode_ignores_steps_beyond_each_length():
    paths = [[1, 0, 2, 3], [1, 1, 2, 2]]
    assert greedy_decode(one_hot_log_probs(paths), [2, 3]) == [[1], [1, 2]]


@pytest.mark.parametrize("a,b,d", [
    ("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0),
    ("ant", "tan", 2), ("moon", "mon", 1), ("lion", "loin", 2), ("", "", 0),
])
def test_levenshtein_on_hand_worked_pairs(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)
    assert levenshtein(list(a), list(b)) == d


@pytest.mark.parametrize("ref,hyp,pairs", [
    ("ant", "ant", [("a", "a"), ("n", "n"), ("t", "t")]),
    ("ant", "an", [("a", "a"), ("n", "n"), ("t", None)]),
    ("ant", "aint", [("a", "a"), (None, "i"), ("n", "n"), ("t", "t")]),
    ("ant", "ent", [("a", "e"), ("n", "n"), ("t", "t")]),
    ("ant", "", [("a", None), ("n", None), ("t", None)]),
    ("", "mu", [(None, "m"), (None, "u")]),
])
def test_edit_alignment_on_hand_worked_pairs(ref, hyp, pairs):
    assert edit_alignment(ref, hyp) == pairs


def test_edit_alignment_is_minimal_and_covers_both_strings():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ref = "".join(rng.choice(list("anto"), size=rng.integers(0, 6)))
        hyp = "".join(rng.choice(list("anto"), size=rng.integers(0, 6)))
        pairs = edit_alignment(ref, hyp)
        assert "".join(r for r, _ in pairs if r) == ref and "".join(h for _, h in pairs if h) == hyp
        assert sum(r != h for r, h in pairs) == levenshtein(ref, hyp)


def test_cer_is_edits_over_target_length():
    assert cer("ant", "ant") == 0.0
    assert cer("an", "ant") == pytest.approx(1 / 3)
    assert cer("", "moon") == 1.0
    assert cer("xy", "") == 2.0


def test_the_three_word_error_rates_on_a_hand_worked_line():
    """Strict: tokens as written; plain: case and punctuation gone; pieces: only the space before
    a punctuation mark or a clitic ignored (the transcriptions write `Mr . Brown` and `it.`)."""
    ref, hyp = 'Mr . Brown said, "he\'s here.', "Mr. brown said , \"he's here ."
    counts = ih.error_counts([ref], [hyp])
    assert (counts["words"], counts["word_edits"]) == (6, 6)  # only "he's matches as written
    assert (counts["plain_words"], counts["plain_word_edits"]) == (5, 0)
    assert ih.piece_words(ref) == ["Mr", ".", "Brown", "said", ",", '"', "he", "'s", "here", "."]
    assert (counts["piece_words"], counts["piece_word_edits"]) == (10, 1)  # Brown -> brown only
    assert ih.rates(counts)["wer_pieces"] == pytest.approx(0.1)


def test_clip_global_norm_scales_all_gradients_together():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_global_norm(grads, 10.0) == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [3.0, 0.0])
    assert clip_global_norm(grads, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0])
    np.testing.assert_allclose(grads["b"], [[0.8]])


def test_adam_first_steps_match_the_update_rule_by_hand():
    params = {"w": np.array([1.0, -2.0]), "b": np.array([0.5])}
    g1 = {"w": np.array([0.1, -3.0]), "b": np.array([2.0])}
    g2 = {"w": np.array([0.3, 1.0]), "b": np.array([-1.0])}
    state = adam_init(params)
    adam_step(params, g1, state, lr=0.01)
    # step 1: m_hat = g, v_hat = g^2, so every parameter moves by lr against sign(g)
    np.testing.assert_allclose(params["w"], [1.0 - 0.01, -2.0 + 0.01], atol=1e-9)
    adam_step(params, g2, state, lr=0.01)
    for k, start in (("w", np.array([0.99, -1.99])), ("b", np.array([0.49]))):
        m = 0.9 * 0.1 * g1[k] + 0.1 * g2[k]
        v = 0.999 * 0.001 * g1[k] ** 2 + 0.001 * g2[k] ** 2
        expected = start - 0.01 * (m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
        np.testing.assert_allclose(params[k], expected, rtol=1e-7)
