"""The synthetic handwriting renderer and the vocabulary split."""
import numpy as np
import pytest

from iam_handwriting import (ALPHABET, GLYPHS, SAMPLE_SPACING, VOCAB, encode, make_streams, pad_batch,
                             render_word, split_vocab)


def test_render_word_shapes_labels_and_trajectory():
    r = render_word("actin", np.random.default_rng(0))
    T = len(r.traj)
    assert r.traj.shape == (T, 3) and r.xy.shape == (T, 2) and r.char_of.shape == (T,)
    assert r.traj.dtype == np.float64
    assert r.labels == [1 + ALPHABET.index(c) for c in "actin"]
    # dx, dy are the steps between absolute positions; the first step is zero
    np.testing.assert_allclose(r.traj[0, :2], 0.0)
    np.testing.assert_allclose(np.cumsum(r.traj[:, :2], axis=0) + r.xy[0], r.xy, atol=1e-12)


@pytest.mark.parametrize("word", ["ant", "actin", "ill", "mint", "o", "tut"])
def test_pen_up_marks_exactly_the_first_sample_of_every_stroke(word):
    r = render_word(word, np.random.default_rng(1))
    pen_up = r.traj[:, 2]
    assert set(np.unique(pen_up)) <= {0.0, 1.0}
    assert pen_up[0] == 1.0
    expected = np.concatenate([GLYPHS[c].stroke_start for c in word])
    np.testing.assert_array_equal(pen_up, expected)
    # i and t lift the pen once inside the letter (the dot, the crossbar)
    assert pen_up.sum() == len(word) + sum(c in "it" for c in word)


@pytest.mark.parametrize("word", VOCAB)
def test_char_of_is_non_decreasing_and_covers_every_character(word):
    r = render_word(word, np.random.default_rng(2))
    assert np.all(np.diff(r.char_of) >= 0)
    np.testing.assert_array_equal(np.unique(r.char_of), np.arange(len(word)))
    starts = np.flatnonzero(np.diff(r.char_of)) + 1
    assert np.all(r.traj[starts, 2] == 1.0)  # every character begins a new stroke


def test_rendering_is_deterministic_for_a_given_rng_and_varies_across_seeds():
    a = render_word("moon", np.random.default_rng(7))
    b = render_word("moon", np.random.default_rng(7))
    c = render_word("moon", np.random.default_rng(8))
    np.testing.assert_array_equal(a.traj, b.traj)
    assert not np.allclose(a.xy, c.xy)


def test_jitter_and_slant_are_the_only_randomness():
    clean = render_word("tile", np.random.default_rng(0), jitter=0.0, slant_max=0.0)
    again = render_word("tile", np.random.default_rng(99), jitter=0.0, slant_max=0.0)
    np.testing.assert_array_equal(clean.xy, again.xy)
    noisy = render_word("tile", np.random.default_rng(0), jitter=0.014, slant_max=0.0)
    assert 0.005 < np.std(noisy.xy - clean.xy) < 0.03


def test_sample_count_follows_ink_length():
    counts = {c: len(GLYPHS[c].points) for c in ALPHABET}
    assert counts["m"] > counts["n"] > counts["i"]
    assert all(n >= 2 for n in counts.values())


@pytest.mark.parametrize("word,bad", [("cat!", "!"), ("Ant", "A"), ("dog", "dg")])
def test_unknown_characters_raise_value_error_naming_them_and_the_alphabet(word, bad):
    with pytest.raises(ValueError, match=f"{bad!r}.*{ALPHABET!r}"):
        render_word(word, np.random.default_rng(0))
    with pytest.raises(ValueError):
        encode(word, ALPHABET)


def test_vocab_has_the_47_words_of_the_earlier_study_and_a_seeded_split():
    assert len(VOCAB) == 47 and len(set(VOCAB)) == 47
    for w in VOCAB:
        encode(w, ALPHABET)
    train, held = split_vocab(make_streams(0)["split"], 0.2)
    assert len(held) == 9 and len(train) == 38
    assert set(train) | set(held) == set(VOCAB) and not set(train) & set(held)
    assert split_vocab(make_streams(0)["split"], 0.2) == (train, held)
    assert split_vocab(make_streams(1)["split"], 0.2)[1] != held


def test_pad_batch_left_aligns_and_zero_pads():
    rng = np.random.default_rng(3)
    renders = [render_word(w, rng) for w in ("moon", "it", "lime")]
    X, lengths = pad_batch(renders, np.zeros(3), np.array([4.0 / SAMPLE_SPACING, 4.0 / SAMPLE_SPACING, 1.0]))
    assert X.shape == (max(lengths), 3, 3)
    for b, r in enumerate(renders):
        assert lengths[b] == len(r.traj)
        np.testing.assert_allclose(X[:lengths[b], b, :2], r.traj[:, :2] * 4.0 / SAMPLE_SPACING)
        np.testing.assert_array_equal(X[:lengths[b], b, 2], r.traj[:, 2])
        assert np.all(X[lengths[b]:, b] == 0)
