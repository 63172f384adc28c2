"""Prefix beam search and lexicon decoding against brute force and word-by-word CTC."""
import dataclasses
import itertools

import numpy as np
import pytest

import iam_handwriting as ih
from iam_handwriting import (VOCAB, beam_search_decode, build_lexicon, ctc_loss, distractor_words, encode,
                             greedy_decode, lexicon_decode, lexicon_log_likelihoods)
from conftest import log_softmax


def labeling_log_probs(lp):
    """Exact log p(labeling) for every labeling reachable in T steps, by enumerating all K^T paths."""
    T, K = lp.shape
    totals = {}
    for path in itertools.product(range(K), repeat=T):
        labeling = tuple(k for i, k in enumerate(path) if k != 0 and (i == 0 or path[i - 1] != k))
        totals[labeling] = np.logaddexp(totals.get(labeling, -np.inf), lp[np.arange(T), path].sum())
    return totals


def nll_of(lp, labels):
    return ctc_loss(lp[:, None, :], [len(lp)], [list(labels)])[0][0]


@pytest.mark.parametrize("T,seed", [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (6, 6), (6, 7)])
def test_wide_beam_finds_the_most_probable_labeling_by_brute_force(T, seed):
    lp = log_softmax(np.random.default_rng(seed).normal(size=(T, 3)) * 1.5)
    totals = labeling_log_probs(lp)
    best = max(totals, key=totals.get)
    labels, log_prob = beam_search_decode(lp, beam_width=1000)  # keeps every prefix
    assert tuple(labels) == best
    np.testing.assert_allclose(log_prob, totals[best], rtol=1e-12)
    np.testing.assert_allclose(log_prob, -nll_of(lp, labels), rtol=1e-12)
    assert all(type(k) is int for k in labels)


def peaked_log_probs(paths, K=5, p=0.99):
    """(T, K) log-probs with probability p on each step of a path."""
    lp = np.full((len(paths), K), np.log((1 - p) / (K - 1)))
    lp[np.arange(len(paths)), paths] = np.log(p)
    return lp


def test_beam_of_width_one_equals_greedy_on_peaked_outputs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        path = rng.integers(0, 5, size=rng.integers(1, 15))
        lp = peaked_log_probs(path)
        assert beam_search_decode(lp, beam_width=1)[0] == greedy_decode(lp[:, None], [len(lp)])[0]


def test_a_pruned_beam_can_lose_to_greedy():
    """Pruning is a heuristic, and this case (found by random search) shows it.

    After step 0 the only prefix kept is [1] (0.64). At step 1, staying at [1]
    scores 0.64 * (0.33 + 0.30) = 0.40 and extending to [1, 2] scores
    0.64 * 0.37 = 0.24, so a beam of width 1 drops [1, 2] and ends with [1].
    But [1, 2] gains more at step 2: its total is 0.46 against 0.26 for [1],
    and best-path decoding (1, 2, 2) finds it. A beam of width 2 keeps it.
    """
    p = np.array([[0.35, 0.64, 0.01], [0.33, 0.30, 0.37], [0.45, 0.07, 0.48]])
    lp = np.log(p)
    greedy = greedy_decode(lp[:, None], [3])[0]
    pruned, pruned_log_prob = beam_search_decode(lp, beam_width=1)
    assert greedy == [1, 2] and pruned == [1]
    np.testing.assert_allclose(np.exp(-nll_of(lp, greedy)), 0.4642, atol=1e-4)
    np.testing.assert_allclose(np.exp(-nll_of(lp, pruned)), 0.2576, atol=1e-4)
    # what the pruned search accumulated for [1] is less than its exact probability
    np.testing.assert_allclose(np.exp(pruned_log_prob), 0.4032 * 0.45 + 0.192 * 0.07, atol=1e-9)
    assert beam_search_decode(lp, beam_width=2)[0] == [1, 2]


@pytest.fixture(scope="module")
def trained_outputs():
    """Log-probs of every evaluation word under a trained --quick model."""
    cfg = dataclasses.replace(ih.RunConfig(seed=1), **ih.TASKS["words"].quick)
    params, _ = ih.train_and_evaluate(cfg, verbose=False)
    data = ih.TASKS["words"].make_data(cfg, ih.make_streams(cfg.seed), ih.serial_map, print)
    return [lp for samples in data.eval_sets.values() for lp in ih.run_model(params, samples, data)]


def test_beam_labeling_is_at_least_as_probable_as_greedy_on_trained_outputs(trained_outputs):
    assert len(trained_outputs) == 376
    for lp in trained_outputs:
        greedy = greedy_decode(lp[:, None], [len(lp)])[0]
        beam, log_prob = beam_search_decode(lp, beam_width=16)
        assert nll_of(lp, beam) <= nll_of(lp, greedy) + 1e-9
        assert log_prob <= -nll_of(lp, beam) + 1e-9  # what the search accumulated is part of the total


def test_beam_of_width_one_equals_greedy_on_trained_outputs(trained_outputs):
    """Peaked: every step's most probable class has probability at least 0.6.
    (Measured: width 1 and greedy differ on 2 of the 376 words, both with a
    step near 0.5, where the two decoders genuinely weigh paths differently.)"""
    peaked = [lp for lp in trained_outputs if np.exp(lp.max(axis=1)).min() >= 0.6]
    assert len(peaked) > 50
    for lp in peaked:
        assert beam_search_decode(lp, beam_width=1)[0] == greedy_decode(lp[:, None], [len(lp)])[0]


LEXICON = ["ant", "tan", "an", "a", "n", "ill", "il", "lll", "noon", "non", "tt", "moon", "mile",
           "actin", "matte", "tonicmilneatonemeantimeoil"]  # repeats, one-letter words, one too long


@pytest.mark.parametrize("T,seed", [(2, 0), (3, 1), (5, 2), (8, 3), (12, 4), (20, 5)])
def test_lexicon_decode_is_the_argmax_of_word_by_word_ctc(T, seed):
    lp = log_softmax(np.random.default_rng(seed).normal(size=(T, 11)) * 2)
    by_word = np.array([-nll_of(lp, encode(w, ih.ALPHABET)) for w in LEXICON])
    scores = lexicon_log_likelihoods(lp[:, None], [T], build_lexicon(LEXICON))[:, 0]
    finite = np.isfinite(by_word)
    np.testing.assert_array_equal(np.isfinite(scores), finite)
    np.testing.assert_allclose(scores[finite], by_word[finite], rtol=1e-12)
    word, log_prob = lexicon_decode(lp, LEXICON)
    assert word == LEXICON[int(np.argmax(by_word))]
    np.testing.assert_allclose(log_prob, by_word.max(), rtol=1e-12)
    assert scores[-1] == -np.inf  # 26 letters need 26 steps: probability zero, never wins


def test_batched_lexicon_scores_equal_one_sequence_at_a_time():
    rng = np.random.default_rng(6)
    lengths = np.array([9, 4, 7])
    lp = log_softmax(rng.normal(size=(9, 3, 11)) * 2)
    lex = build_lexicon(LEXICON)
    batched = lexicon_log_likelihoods(lp, lengths, lex)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(batched[:, b], lexicon_log_likelihoods(lp[:n, b:b + 1], [n], lex)[:, 0])


def test_word_prior_is_added_to_the_score():
    lp = log_softmax(np.random.default_rng(7).normal(size=(6, 11)))
    word, log_prob = lexicon_decode(lp, LEXICON)
    prior = np.zeros(len(LEXICON))
    prior[LEXICON.index("moon")] = 50.0
    boosted, boosted_log_prob = lexicon_decode(lp, LEXICON, word_log_prior=prior)
    assert boosted == "moon" != word
    np.testing.assert_allclose(boosted_log_prob, 50.0 - nll_of(lp, encode("moon", ih.ALPHABET)))
    with pytest.raises(ValueError, match="one value per word"):
        lexicon_decode(lp, LEXICON, word_log_prior=[0.0])


def test_one_word_lexicon_returns_it_and_bad_lexicons_raise():
    lp = log_softmax(np.random.default_rng(8).normal(size=(6, 11)))
    assert lexicon_decode(lp, ["moon"])[0] == "moon"
    with pytest.raises(ValueError, match="empty"):
        lexicon_decode(lp, [])
    with pytest.raises(ValueError, match="empty word"):
        build_lexicon(["ant", ""])
    with pytest.raises(ValueError, match="'d'.*alphabet"):
        lexicon_decode(lp, ["ant", "dot"])


def test_distractors_are_nested_distinct_pseudo_words():
    small, large = distractor_words(100), distractor_words(2000)
    assert large[:100] == small
    assert len(set(large)) == 2000 and not set(large) & set(VOCAB)
    assert {len(w) for w in large} == {3, 4, 5}
    build_lexicon(large)  # every letter is in the alphabet
