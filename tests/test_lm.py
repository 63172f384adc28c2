"""The language model and the token-passing line decoder, against brute force."""
import dataclasses
import itertools
import types

import numpy as np
import pytest

import iam_handwriting as ih
from conftest import log_softmax

ALPHA = "abn "  # a tiny alphabet with the space, K = 5
WORDS = ["a", "ab", "ba", "nab", "b", "aa"]


def tiny_bigram(rng, V=len(WORDS)):
    """A random BigramModel over V words: two listed followers per word plus back-off."""
    keys, probs, backoff = [], [], np.zeros(V)
    for v in range(V):
        followers = np.sort(rng.choice(V, size=2, replace=False))
        p = rng.dirichlet(np.ones(3))
        keys += [v * V + f for f in followers]
        probs += list(p[:2])
        backoff[v] = p[2]
    return ih.BigramModel(tuple(WORDS[:V]), rng.dirichlet(np.ones(V)), np.array(keys, np.int64), np.array(probs),
                          backoff, 0.5)


def brute_force(lp, words, lm, lm_weight, word_penalty):
    """The best word sequence by enumeration: every sequence whose labels fit in T
    steps, scored with the existing ctc_log_likelihood summed over the four
    edge-space variants, plus the LM and the penalty. Returns (words, score)."""
    T, space = len(lp), 1 + ALPHA.index(" ")
    seqs = [seq for n in range(1, T + 1) for seq in itertools.product(range(len(words)), repeat=n)
            if len(" ".join(words[i] for i in seq)) <= T]
    variants = []
    for seq in seqs:
        labels = ih.encode(" ".join(words[i] for i in seq), ALPHA)
        variants += [labels, [space] + labels, labels + [space], [space] + labels + [space]]
    ll = ih.ctc_log_likelihood(np.repeat(lp[:, None], len(variants), 1), [T] * len(variants), variants)
    scores = []
    for k, seq in enumerate(seqs):
        lm_score = 0.0
        if lm is not None:
            lm_score = ih.lm_log_prob(lm, [ih.LM_START] + list(seq[:-1]), list(seq)).sum() + np.log(lm.p_end)
        scores.append(np.logaddexp.reduce(ll[4 * k:4 * k + 4]) + lm_weight * lm_score + word_penalty * len(seq))
    best = int(np.argmax(scores))
    return [words[i] for i in seqs[best]], scores[best]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("order,lm_weight,word_penalty", [(None, 0.0, 0.0), (None, 0.0, -1.5), (2, 1.0, 0.5),
                                                          (1, 2.0, -1.0), (2, 0.7, 2.0)])
def test_unpruned_decoding_finds_the_brute_force_best_with_its_exact_score(seed, order, lm_weight, word_penalty):
    rng = np.random.default_rng(seed)
    lm = ih.LanguageModel(tiny_bigram(rng), 0.3, order) if order else None
    lex = ih.build_lexicon(WORDS, ALPHA)
    for T in (2, 4, 6):
        lp = log_softmax(rng.normal(size=(T, len(ALPHA) + 1)) * 2)
        expected, expected_score = brute_force(lp, WORDS, lm, lm_weight, word_penalty)
        words, score, _ = ih.lm_decode(lp, lex, lm, lm_weight, word_penalty, beam=None)
        assert words == expected
        np.testing.assert_allclose(score, expected_score, rtol=1e-10)


def test_a_beam_that_prunes_nothing_gives_the_exact_result():
    rng = np.random.default_rng(11)
    lm = ih.LanguageModel(tiny_bigram(rng), 0.3, 2)
    lex = ih.build_lexicon(WORDS, ALPHA)
    lp = log_softmax(rng.normal(size=(6, 5)) * 2)
    exact = ih.lm_decode(lp, lex, lm, 1.0, 0.0, beam=None)
    wide = ih.lm_decode(lp, lex, lm, 1.0, 0.0, beam=100_000)  # every token fits
    # the emission floor is the only other pruning; these outputs have no label below it
    assert np.exp(lp).min() > ih.EMISSION_FLOOR
    assert wide[0] == exact[0] and wide[1] == pytest.approx(exact[1], rel=1e-12)


def peaked(labels, T, K, rng, p=0.97):
    """(T, K) log-probs of a confident network reading `labels` (class ids), with blanks between."""
    path = np.zeros(T, dtype=int)
    at = np.sort(rng.choice(np.arange(1, T - 1), size=len(labels), replace=False))
    path[at] = labels
    lp = np.log(np.full((T, K), (1 - p) / (K - 1)))
    lp[np.arange(T), path] = np.log(p)
    return log_softmax(lp + rng.normal(0, 0.3, size=lp.shape))


def test_one_word_lines_with_lm_weight_zero_agree_with_the_single_word_lexicon_decoder():
    rng = np.random.default_rng(3)
    words = list(ih.english_words()[0][:300])
    lex = ih.build_lexicon(words, ih.LINE_ALPHABET)
    K = len(ih.LINE_ALPHABET) + 1
    for word in rng.choice(words, size=40):
        lp = peaked(ih.encode(word, ih.LINE_ALPHABET), 3 * len(word) + 4, K, rng, p=0.6)
        single, single_score = ih.lexicon_decode(lp, lex)
        line, line_score, _ = ih.lm_decode(lp, lex, None, 0.0, 0.0, beam=64)
        assert line == [single]
        # the line decoder also adds the edge-space variants: never less probable
        assert line_score >= single_score - 1e-9


def test_language_model_probabilities_sum_to_one_and_back_off_for_unseen_pairs():
    for order in (1, 2):
        lm = ih.language_model(2000, order)
        V = len(lm.bigram.words)
        for prev in (ih.LM_START, 0, 5, 1999):
            total = np.exp(ih.lm_log_prob(lm, np.full(V, prev), np.arange(V))).sum()
            total += 0.0 if prev == ih.LM_START else lm.p_end
            assert total == pytest.approx(1.0, abs=1e-9)
    bigram = ih.language_model(2000, 2).bigram
    keys = set(bigram.pair_key.tolist())
    the, unseen = 0, next(w for w in range(1999, 0, -1) if w not in {k % 2000 for k in keys if k // 2000 == 0})
    p = ih.bigram_prob(bigram, [the], [unseen])[0]
    assert p == pytest.approx(bigram.backoff[the] * bigram.unigram[unseen]) and p > 0
    assert 0 < bigram.discount < 1


def test_perplexity_and_oov_rate_on_known_text():
    lm = ih.language_model(1000, 2)
    ppl, oov = ih.lm_perplexity(lm, ["the of and", "zyzzyva the"])
    assert oov == pytest.approx(1 / 5)
    lp = ih.lm_log_prob(lm, [ih.LM_START, 0, 1, ih.LM_START], [0, 1, 2, 0]).sum() + 2 * np.log(lm.p_end)
    assert ppl == pytest.approx(np.exp(-lp / 6))


@pytest.mark.parametrize("call,message", [
    (lambda: ih.build_lexicon([], ih.LINE_ALPHABET), "empty"),
    (lambda: ih.build_lexicon(["ok", "Caps"], ih.LINE_ALPHABET), "'C'"),
    (lambda: ih.build_lexicon(["ok", "ok"], ih.LINE_ALPHABET), "more than once"),
    (lambda: ih.lm_decode(np.zeros((3, 28)), ih.build_lexicon(["ok"], ih.LINE_ALPHABET), None, beam=-2), "beam"),
    (lambda: ih.lm_decode(np.zeros((3, 11)), ih.build_lexicon(["ant"]), None), "space"),
])
def test_bad_decoder_input_raises_one_line_value_errors(call, message):
    with pytest.raises(ValueError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_a_wider_beam_can_report_a_lower_score_for_the_same_line():
    """Beam pruning is not monotone. Found by random search; kept as a documented case.

    Words a, ab, ba, b over "abn ". The exact probability of the line "a" (all
    four edge-space variants) is 0.1569. At the last step a beam of 2 keeps the
    token "a" (0.1388) and "a" followed by a space (0.0161): 0.1549. A beam of
    3 has also kept two prefixes that lead nowhere, a leading space (0.0186)
    and "b" (0.0168), and these push "a" + space out of its three places at
    the last step: 0.1398, though it still finds the same words.
    """
    p = np.array([[0.33, 0.12, 0.02, 0.46, 0.07], [0.17, 0.27, 0.04, 0.51, 0.01], [0.79, 0.06, 0.01, 0.04, 0.10]])
    lex = ih.build_lexicon(["a", "ab", "ba", "b"], ALPHA)
    narrow, wider, exact = (ih.lm_decode(np.log(p), lex, None, 0.0, 0.0, beam=b) for b in (2, 3, None))
    assert narrow[0] == wider[0] == exact[0] == ["a"]
    np.testing.assert_allclose(np.exp([narrow[1], wider[1], exact[1]]), [0.154902, 0.139776, 0.156924], atol=1e-6)
    assert wider[1] < narrow[1] < exact[1]


def test_a_token_is_dominated_only_by_its_groups_best_with_the_same_future_and_both_masses_at_least_its():
    """Histories 1 = [w0] and 2 = [w1, w0] end on the same entry, so tokens on one
    node with either history have the same future; history 0 (empty) has another."""
    histories = types.SimpleNamespace(word=np.array([ih.LM_START, 0, 0]), score=np.array([0.0, -1.0, -2.0]))
    #                   A     B     C     D     E     F     G
    hist = np.array([1, 2, 2, 2, 2, 1, 0])
    node = np.array([3, 3, 3, 3, 4, 3, 3])
    glued = np.array([0, 0, 0, 0, 0, 1, 0])
    on_label = np.array([-1.0, -1.5, 0.0, -3.0, -9.0, -9.0, -9.0])
    in_blank = np.array([-2.0, -3.0, -5.0, -0.5, -9.0, -9.0, -9.0])
    # A leads its group (A-D); B is below it in both masses, C ties its on-label mass and is
    # below in the other; D is above it in the in-blank mass; E, F and G have other futures.
    dominated = ih._dominated(histories, hist, node, glued, on_label, in_blank, n_nodes=5)
    assert dominated.tolist() == [False, True, True, False, False, False, False]


def test_the_beam_is_chosen_among_the_tokens_that_are_not_dominated():
    """Five tokens: A, B and C share one future and B and C are dominated by A; D
    (another history) and E (another node) have futures of their own. Even without
    B and C more than a beam of 2 remain; the two kept must be the best of the
    rest, A and D, not B and C, which outscore D."""
    histories = types.SimpleNamespace(word=np.array([ih.LM_START, 0, 0]), score=np.array([0.0, 0.0, 0.0]))
    #                   A     B     C     D     E
    hist = np.array([1, 2, 2, 0, 0])
    node = np.array([3, 3, 3, 3, 4])
    glued = np.zeros(5, int)
    on_label = np.array([0.0, -0.1, -0.2, -5.0, -6.0])
    in_blank = np.array([0.0, -0.1, -0.2, -5.0, -6.0])
    kept = ih._beam_survivors(histories, hist, node, glued, on_label, in_blank, 5, beam=2)
    assert kept.tolist() == [True, False, False, True, False]
    # Where dropping the dominated is enough, all the rest stay; with no beam, everything reachable.
    assert ih._beam_survivors(histories, hist, node, glued, on_label, in_blank, 5, beam=3).tolist() == \
        [True, False, False, True, True]
    on_label[4] = in_blank[4] = -np.inf
    assert ih._beam_survivors(histories, hist, node, glued, on_label, in_blank, 5, beam=None).tolist() == \
        [True, True, True, True, False]


# Real English: case spellings, punctuation and clitics glued to words, spelled out-of-dictionary tokens.

EN_ALPHA = "adA',1 "  # K = 8 with the blank
EN_WORDS = ("a", "ad", ",", "'d", "d")  # LM words: a word, a longer one, punctuation, a clitic


def spelled_token_log_prob(chars, lex):
    """log P of one spelled token (its characters, as strings) under lex.spelling, edges included."""
    spelled = [w for w, k in zip(lex.words, lex.kind) if k == ih.SPELLED]
    path = [len(spelled)] + [spelled.index(c) for c in chars] + [len(spelled)]
    return sum(lex.spelling[a, b] for a, b in zip(path, path[1:]))


def reading_score(seq, lex, lm, lm_weight, word_penalty, oov_penalty):
    """The objective of one reading [(entry, glued)], entry by entry in plain Python."""
    score, context, prev, token = 0.0, ih.LM_START, None, []  # token: the spelled token being read
    for e, glued in seq:
        kind = lex.kind[e]
        score += lex.cost[e]
        goes_on = kind == ih.SPELLED and glued and prev is not None and lex.kind[prev] == ih.SPELLED
        if token and not goes_on:
            score += spelled_token_log_prob(token, lex)
            token = []
        if kind == ih.SPELLED:
            if not goes_on:  # a new spelled token
                score += word_penalty + oov_penalty
            token.append(lex.words[e])
            context = ih.LM_START
        else:
            score += word_penalty + (lm_weight * float(ih.lm_log_prob(lm, [context], [lex.lm_id[e]])[0]) if lm else 0)
            context = int(lex.lm_id[e])
        prev = e
    score += spelled_token_log_prob(token, lex) if token else 0.0
    return score + (lm_weight * float(ih.lm_end_log_prob(lm, [context])[0]) if lm else 0.0)


def readings(lex, T):
    """Every [(entry, glued)] whose labels (a space before each entry not glued) fit in T."""
    out = []

    def grow(seq, length):
        if seq:
            out.append(list(seq))
        for e, w in enumerate(lex.words):
            for glued in (False, True):
                if glued and (not seq or not ih.GLUES[lex.kind[seq[-1][0]], lex.kind[e]]):
                    continue
                extra = len(w) + (0 if glued or not seq else 1)
                if length + extra <= T:
                    grow(seq + [(e, glued)], length + extra)
    grow([], 0)
    return out


def brute_force_readings(lp, lex, lm, lm_weight, word_penalty, oov_penalty):
    """The best reading by enumeration, scored with ctc_log_likelihood over the four
    edge-space variants plus reading_score. Returns (entries, score, glued)."""
    T, space = len(lp), 1 + lex.alphabet.index(" ")
    seqs = readings(lex, T)
    variants = []
    for seq in seqs:
        labels = ih.encode(ih.glue_pieces([(lex.words[e], g) for e, g in seq]), lex.alphabet)
        variants += [labels, [space] + labels, labels + [space], [space] + labels + [space]]
    ll = ih.ctc_log_likelihood(np.repeat(lp[:, None], len(variants), 1), [T] * len(variants), variants)
    scores = [np.logaddexp.reduce(ll[4 * k:4 * k + 4]) + reading_score(seq, lex, lm, lm_weight, word_penalty,
                                                                           oov_penalty) for k, seq in enumerate(seqs)]
    best = int(np.argmax(scores))
    return [lex.words[e] for e, _ in seqs[best]], scores[best], [g for _, g in seqs[best]]


EN_SPELLING_PIECES = ("ad", "a1", "dAd", "11", "d")  # the character bigram's training words


def english_lexicon(oov):
    case = {"lower": np.log(0.7), "capital": np.log(0.2), "upper": np.log(0.1)}
    return ih.reading_lexicon(EN_WORDS, EN_ALPHA, case, oov, EN_SPELLING_PIECES)


def english_lm(rng, order):
    words = tiny_bigram(rng, len(EN_WORDS))
    return ih.LanguageModel(dataclasses.replace(words, words=EN_WORDS), 0.3, order)


def sparse_log_probs(rng, T, K, below_floor=0.0):
    """Random (T, K) log-probs; with below_floor > 0 that share of non-blank entries is pushed far below the floor."""
    z = rng.normal(size=(T, K)) * 2
    z[:, 1:] -= 20 * (rng.random((T, K - 1)) < below_floor)
    return log_softmax(z)


def path_log_probs(path, rng, p=0.85):
    """(T, K) log-probs of a network confident of one label per step ("" the blank), with noise:
    ["a", "", "a", "d"] reads "aad", which no reading of words alone spells without a space."""
    ids = [0 if c == "" else 1 + EN_ALPHA.index(c) for c in path]
    lp = np.log(np.full((len(path), len(EN_ALPHA) + 1), (1 - p) / len(EN_ALPHA)))
    lp[np.arange(len(path)), ids] = np.log(p)
    return log_softmax(lp + rng.normal(0, 0.3, size=lp.shape))


def test_the_reading_lexicon_holds_each_spelling_the_alphabet_can_write_with_its_case_cost():
    lex = english_lexicon("chars")
    entries = {(w, int(k)): (int(i), c) for w, k, i, c in zip(lex.words, lex.kind, lex.lm_id, lex.cost)}
    assert entries[("a", ih.WORD)] == (0, pytest.approx(np.log(0.7)))
    assert entries[("A", ih.WORD)] == (0, pytest.approx(np.log(0.3)))  # Capitalised and CAPITALS coincide
    assert entries[("ad", ih.WORD)] == (1, pytest.approx(np.log(0.7 / 0.9)))  # "AD" needs a 'D'
    assert entries[("Ad", ih.WORD)] == (1, pytest.approx(np.log(0.2 / 0.9)))
    assert entries[(",", ih.PUNCT)] == (2, 0.0) and entries[("'d", ih.CLITIC)] == (3, 0.0)
    spelled = {w: c for (w, k), (_, c) in entries.items() if k == ih.SPELLED}
    assert spelled == {c: pytest.approx(-np.log(4)) for c in "adA1"}  # letters and digits, each 1/4
    assert len(lex.words) == 7 + 4


def test_the_character_bigram_is_the_interpolated_count_of_its_training_words():
    """Over chars "ab" (edge index 2): the words "ab", "ab", "b" give the pairs
    edge-a x2, a-b x2, b-edge x3, edge-b x1, smoothed towards the add-one unigram
    of the positions they end on with the weight a = SPELLING_PRIOR_WEIGHT."""
    chars, a = "ab", ih.SPELLING_PRIOR_WEIGHT
    lp = ih.spelling_log_probs(["ab", "ab", "b", "a-b", ""], chars)  # "a-b" holds a foreign character: skipped
    p = np.exp(lp)
    # Counts by position (the column): a 2, b 3, edge 3; n = 8 pairs.
    unigram = np.array([2 + 1, 3 + 1, 3 + 1]) / (8 + 3)
    assert p[0, 1] == pytest.approx((2 + a * unigram[1]) / (2 + a))  # b after a: both times
    assert p[0, 0] == pytest.approx(a * unigram[0] / (2 + a))  # never seen: the unigram's share
    assert p[1, 2] == pytest.approx((3 + a * unigram[2]) / (3 + a))
    assert p[2, 2] == 0.0  # an empty token is impossible
    np.testing.assert_allclose(p.sum(1), 1.0)
    first = np.array([2 + a * unigram[0], 1 + a * unigram[1]]) / (3 + a)
    np.testing.assert_allclose(p[2, :2], first / first.sum())
    # No words at all: every character alike after the edge.
    empty = np.exp(ih.spelling_log_probs([], chars))
    assert empty[2, 0] == pytest.approx(empty[2, 1]) and empty[2, 2] == 0.0
    # Read without training transcriptions (a model file on new ink), the dictionary's words are the pieces.
    lex = ih.reading_lexicon(("ab", "b"), "ab ", {"lower": 0.0, "capital": -50.0, "upper": -50.0}, "char-bigram")
    np.testing.assert_array_equal(lex.spelling, ih.spelling_log_probs(("ab", "b"), chars))


def test_the_character_bigram_reads_the_spelling_its_words_make_likely_where_the_ink_cannot_tell():
    """Ink that is half 'd', half 'A' at its second step: 'ad' and 'aA' are equally
    inked, and only the character model of the spelled token chooses between them,
    the way its training words go ('dAd' puts A after d, 'ad' puts d after a)."""
    rng = np.random.default_rng(7)
    lex = ih.reading_lexicon(("d",), EN_ALPHA, {"lower": 0.0, "capital": -50.0, "upper": -50.0}, "char-bigram",
                             ("ad", "ad", "ad", "dAd"))
    K = len(EN_ALPHA) + 1
    lp = np.full((2, K), np.log(1e-4))
    lp[0, 1 + EN_ALPHA.index("a")] = np.log(0.98)
    lp[1, 1 + EN_ALPHA.index("d")] = lp[1, 1 + EN_ALPHA.index("A")] = np.log(0.49)
    lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)
    words, _, _ = ih.lm_decode(lp, lex, None, 0.0, 0.0, beam=None, oov_penalty=0.0)
    assert "".join(words) == "ad"
    flipped = ih.reading_lexicon(("d",), EN_ALPHA, {"lower": 0.0, "capital": -50.0, "upper": -50.0}, "char-bigram",
                                 ("aA", "aA", "aA", "dAd"))
    assert "".join(ih.lm_decode(lp, flipped, None, 0.0, 0.0, beam=None, oov_penalty=0.0)[0]) == "aA"
    # The uniform character cost cannot tell them apart: its reading is whichever the tie falls on.
    uniform = ih.reading_lexicon(("d",), EN_ALPHA, {"lower": 0.0, "capital": -50.0, "upper": -50.0}, "chars")
    spelled = {w: e for e, (w, k) in enumerate(zip(uniform.words, uniform.kind)) if k == ih.SPELLED}
    scores = [reading_score([(spelled[c], i > 0) for i, c in enumerate(w)], uniform, None, 0, 0, 0)
              for w in ("ad", "aA")]
    assert scores[0] == scores[1]


def test_a_spelling_model_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="spelling model"):
        ih.build_lexicon(["a", "b"], "ab ", np.array([ih.WORD, ih.SPELLED]), np.array([0, -1]), None, np.zeros((3, 3)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("oov,order,lm_weight,word_penalty,oov_penalty", [
    ("chars", 2, 1.0, 0.5, -1.0), ("token", 1, 0.7, -0.5, 1.0), ("none", 2, 2.0, 0.0, 0.0), ("chars", None, 0.0, 1.0, 0.5),
    ("char-bigram", 2, 1.0, 0.5, -1.0), ("char-bigram", None, 0.0, -0.5, 2.0)])
def test_unpruned_decoding_of_cased_glued_and_spelled_tokens_is_the_brute_force_best(seed, oov, order, lm_weight,
                                                                                      word_penalty, oov_penalty):
    rng = np.random.default_rng(100 + seed)
    lex = english_lexicon(oov)
    lm = english_lm(rng, order) if order else None
    confident = [path_log_probs(path, rng) for path in (["a", "", "a", "d"], ["d", "'", "d", ","], ["A", "1", "", "1"],
                                                        ["'", "d", "'", "d"])]
    for lp in [sparse_log_probs(rng, T, len(EN_ALPHA) + 1) for T in (2, 3, 4)] + confident:
        expected = brute_force_readings(lp, lex, lm, lm_weight, word_penalty, oov_penalty)
        words, score, glued = ih.lm_decode(lp, lex, lm, lm_weight, word_penalty, None, oov_penalty)
        assert (words, glued) == (expected[0], expected[2])
        np.testing.assert_allclose(score, expected[1], rtol=1e-10)


def test_glued_punctuation_and_clitics_come_back_as_written():
    """A confident network writing 'Ad, a'd 1a' reads it back with the glue."""
    rng = np.random.default_rng(5)
    lex = english_lexicon("chars")
    text = "Ad, a'd 1a"
    lp = peaked(ih.encode(text, EN_ALPHA), 3 * len(text) + 2, len(EN_ALPHA) + 1, rng, p=0.9)
    words, _, glued = ih.lm_decode(lp, lex, None, 0.0, 0.0, beam=64)
    assert ih.glue_pieces(list(zip(words, glued))) == text
    assert words == ["Ad", ",", "a", "'d", "1", "a"] and glued == [False, True, False, True, False, True]


@pytest.mark.parametrize("seed", range(12))
def test_a_beam_that_never_fills_gives_the_exact_result_even_where_labels_are_below_the_floor(seed):
    """The emission floor prunes only once the beam is full, so a beam wider than
    every token the line can have is exact, also where most labels are below the floor."""
    rng = np.random.default_rng(200 + seed)
    lex = english_lexicon(("chars", "token", "none", "char-bigram")[seed % 4])
    lm = english_lm(rng, 2)
    T = 5
    lp = sparse_log_probs(rng, T, len(EN_ALPHA) + 1, below_floor=0.5)
    assert (np.exp(lp[:, 1:]) < ih.EMISSION_FLOOR).any()
    exact = ih.lm_decode(lp, lex, lm, 1.0, 0.5, beam=None, oov_penalty=-1.0)
    wide = ih.lm_decode(lp, lex, lm, 1.0, 0.5, beam=10**6, oov_penalty=-1.0)
    assert (wide[0], wide[2]) == (exact[0], exact[2]) and wide[1] == pytest.approx(exact[1], rel=1e-12)


def test_once_the_beam_is_full_the_leading_space_is_held_to_the_floor_like_every_label():
    """Words ["a"] over "ab ". Step 1: blank or 'b' (no word starts with b), the
    space far below the floor; step 2: 'a'; step 3: blank. A beam of 1 is full
    at the first step, so no label below the floor may be entered there: the
    line "a" then scores exactly its alignments that enter nothing below the
    floor, (blank, a, blank), (blank, a, a) and (blank, blank, a); a leading
    space entered out of the all-blank start at step 1 would add its 1e-6 share."""
    p = np.array([[0.5, 1e-9, 0.5 - 1e-6 - 1e-9, 1e-6],  # blank, a, b, space
                  [0.01, 0.98, 0.005, 0.005],
                  [0.97, 0.02, 0.01 - 1e-9, 1e-9]])
    lex = ih.build_lexicon(["a"], "ab ")
    words, score, _ = ih.lm_decode(np.log(p), lex, None, 0.0, 0.0, beam=1)
    assert words == ["a"]
    assert score == pytest.approx(np.log(p[0, 0] * (p[1, 1] * (p[2, 0] + p[2, 1]) + p[1, 0] * p[2, 1])), abs=1e-12)


def test_a_clitic_never_glues_to_a_clitic_even_through_a_punctuation_prefix():
    """Entries "'" (punctuation) and "'d" (clitic). After "'d", the subtree of "'"
    may be entered glued (for the punctuation), but completing "'d" there would
    glue a clitic to a clitic: a network writing "'d'd" gets a valid reading
    (here the labels of one "'d" only, cheaper than a space), never "'d" glued to "'d"."""
    rng = np.random.default_rng(9)
    lex = ih.build_lexicon(["'", "'d"], EN_ALPHA, kind=[ih.PUNCT, ih.CLITIC])
    lp = path_log_probs(["'", "d", "'", "d"], rng)
    expected = brute_force_readings(lp, lex, None, 0.0, 0.0, 0.0)
    words, score, glued = ih.lm_decode(lp, lex, None, 0.0, 0.0, beam=None)
    assert (words, glued) == (expected[0], expected[2])
    assert True not in glued
    assert score == pytest.approx(expected[1], rel=1e-10)
