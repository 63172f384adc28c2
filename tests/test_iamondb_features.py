"""IAM-OnDB preprocessing (Liwicki and Bunke 2006) and the 25 online features: each
preprocessing step on a case with a known answer, each feature on a hand-worked case, the
vectorised features against plain per-point loops, and degenerate lines."""
import numpy as np
import pytest

import iam_handwriting as ih

DEG = np.pi / 180


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def polyline(corners, step=0.05):
    """Dense points along straight segments through corners, (n, 2), about step apart."""
    corners = np.asarray(corners, dtype=float)
    parts = []
    for a, b in zip(corners[:-1], corners[1:]):
        n = max(2, int(np.ceil(np.linalg.norm(b - a) / step)) + 1)
        parts.append(np.linspace(a, b, n)[:-1])
    return np.vstack(parts + [corners[-1:]])


def zigzag(n_teeth=12, step=0.05):
    """Upright y-up writing: vertical down strokes 1 high joined by rising diagonals, plus a
    horizontal exit; the slant of this line is 0 by construction."""
    corners = [(0.0, 1.0)]
    for k in range(n_teeth):
        corners += [(k * 1.0, 0.0), (k + 1.0, 1.0)]
    corners.append((n_teeth + 1.0, 1.0))
    return polyline(corners, step)


def make_pre(points, stroke=None, hat=None, speed=None):
    """A Preprocessed built by hand, to test features without the preprocessing."""
    points = np.asarray(points, dtype=float)
    t = len(points)
    stroke = np.zeros(t, dtype=np.int64) if stroke is None else np.asarray(stroke)
    return ih.Preprocessed(
        points=points, stroke=stroke, pen_up=ih.stroke_starts(stroke).astype(float),
        speed=np.zeros(t) if speed is None else speed,
        hat=np.zeros(t) if hat is None else hat, hat_ranges=np.zeros((0, 2)),
        baseline=ih.FittedLine(0.0, 0.0), corpus=ih.FittedLine(1.0, 0.0), corpus_height=1.0,
        skew=0.0, slant=0.0, spacing=ih.IAM_SPACING)


def resample(points, stroke, spacing):
    """Even steps along the ink, as preprocess resamples: (new points, new stroke, frac index)."""
    return ih.resample_strokes(points, stroke, ih.ink_length(points, stroke), spacing)


def synthetic_line(rng, n_words=10, letters_per_word=5, corpus_px=120.0, skew_deg=0.0,
                   slant_deg=0.0, dots=True):
    """A cursive-like test line in IAM-OnDB form: (points (N, 2) y down, stroke (N,), times (N,)).

    Each word is one stroke of looped letters x(u) = x0 + w u - r sin(2 pi u) whose height
    is 1 (x-height loop), 2 (ascender) or -1 (descender) corpus heights, sampled every 20 ms
    at varying speed; after each word a dot (2 points at y ~ 1.6) goes back over one of its
    x-height letters. Then the whole line is sheared by slant_deg, rotated by skew_deg
    (rising to the right) and mapped to sensor units (corpus_px per corpus height, y down).
    """
    pts, ids = [], []
    x0, sid = 0.0, 0
    for _ in range(n_words):
        kinds = rng.choice(3, size=letters_per_word, p=[0.6, 0.25, 0.15])
        word, x_height_letters = [], []
        for kind in kinds:
            n = int(rng.integers(14, 22))
            u = np.sort(rng.uniform(0, 1, n))  # uneven speed
            u[0], u[-1] = 0.0, 1.0
            height = (1.0, 2.0, -1.0)[kind]
            w = 0.9
            lx = x0 + w * u - 0.25 * np.sin(2 * np.pi * u)
            ly = height * 0.5 * (1 - np.cos(2 * np.pi * u))
            word.append(np.column_stack([lx, ly])[:-1])
            if kind == 0:
                x_height_letters.append(x0 + 0.5 * w)
            x0 += w
        word = np.concatenate(word)
        pts.append(word)
        ids.append(np.full(len(word), sid))
        sid += 1
        if dots and x_height_letters:
            xd = rng.choice(x_height_letters)
            pts.append(np.array([[xd, 1.6], [xd + 0.03, 1.62]]))
            ids.append(np.full(2, sid))
            sid += 1
        x0 += 0.8  # word gap
    xy = np.concatenate(pts)
    xy[:, 0] += np.tan(np.radians(slant_deg)) * xy[:, 1]
    xy = ih.rotate(xy, np.radians(skew_deg), np.zeros(2))
    sensor = np.column_stack([300.0 + corpus_px * xy[:, 0], 2000.0 - corpus_px * xy[:, 1]])
    return sensor, np.concatenate(ids), np.arange(len(sensor)) * ih.SAMPLE_PERIOD


def to_sensor(points_up, corpus_px=100.0):
    """y-up corpus-height points -> IAM-style sensor units (y down)."""
    return np.column_stack([500 + corpus_px * points_up[:, 0], 3000 - corpus_px * points_up[:, 1]])


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("points, stroke, message", [
    (np.zeros((0, 2)), np.zeros(0, int), "empty"),
    ([], [], "empty"),
    (np.zeros((3, 3)), np.zeros(3, int), "shape"),
    (np.zeros((3, 2)), np.array([0, 1, 0]), "non-decreasing"),
    (np.array([[0.0, 0.0], [np.nan, 1.0]]), np.zeros(2, int), "finite"),
])
def test_unusable_input_raises_a_clear_value_error(points, stroke, message):
    with pytest.raises(ValueError, match=message):
        ih.preprocess(points, stroke, None)


def test_stroke_ids_are_relabelled_to_consecutive_integers():
    _, stroke, _ = ih.validate_line(np.zeros((5, 2)), np.array([3, 3, 7, 9, 9]))
    assert stroke.tolist() == [0, 0, 1, 2, 2]
    _, stroke, _ = ih.validate_line(np.zeros((3, 2)), np.array([-1, -1, 0]))  # a first id of -1 too
    assert stroke.tolist() == [0, 0, 1]
    # the export's ids need not increase: one stroke per run
    assert ih.relabel_strokes(np.array([5, 5, 2, -1, -1, 5])).tolist() == [0, 0, 1, 2, 2, 3]
    assert ih.relabel_strokes(np.array([], dtype=int)).tolist() == []


# ---------------------------------------------------------------------------
# 1. Duplicates and noise
# ---------------------------------------------------------------------------

def test_consecutive_duplicates_within_a_stroke_are_dropped_with_their_times():
    points = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [2, 0],  # stroke 0
                       [2, 0], [3, 0]], dtype=float)  # stroke 1 starts where 0 ended: kept
    stroke = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    times = np.arange(8.0)
    p, s, t = ih.remove_duplicates_and_noise(points, stroke, times)
    assert p[:, 0].tolist() == [0, 1, 2, 2, 3]
    assert s.tolist() == [0, 0, 0, 1, 1]
    assert t.tolist() == [0, 2, 5, 6, 7]


def test_a_spike_is_dropped_and_ordinary_points_are_kept():
    points = polyline([(0, 0), (10, 0)], step=0.5)  # 21 points 0.5 apart
    spiked = points.copy()
    spiked[10] = (5.0, 40.0)  # out 40 and straight back: a tracker glitch
    stroke = np.zeros(len(points), dtype=int)
    p, _, _ = ih.remove_duplicates_and_noise(spiked, stroke, np.arange(len(points)) * 0.02)
    assert len(p) == len(points) - 1
    assert not np.any(p[:, 1] > 0)
    p_clean, _, _ = ih.remove_duplicates_and_noise(points, stroke, np.arange(len(points)) * 0.02)
    assert len(p_clean) == len(points)


def test_a_far_speck_is_dropped_but_an_i_dot_stays():
    word = zigzag(6)  # y in [0, 1], 6 wide
    dot = np.array([[2.0, 1.6]])  # an i-dot, 0.6 above the ink
    speck = np.array([[3.0, 9.0]])  # a lone point 8 above the line
    points = np.vstack([word, dot, speck])
    stroke = np.r_[np.zeros(len(word), int), 1, 2]
    p, s, _ = ih.remove_duplicates_and_noise(points, stroke, np.arange(len(points)) * 0.02)
    assert len(p) == len(word) + 1
    assert np.allclose(p[-1], dot[0])
    assert s.max() == 1


# ---------------------------------------------------------------------------
# 2. Skew
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("skew_deg", [-6.0, 0.0, 4.0])
def test_skew_of_a_rotated_line_is_recovered_within_a_fifth_of_a_degree(skew_deg):
    rng = np.random.default_rng(1)
    points, stroke, times = synthetic_line(rng, skew_deg=skew_deg)
    points, stroke, _ = ih.validate_line(points, stroke, times)
    levelled, angle = ih.correct_skew(ih.flip_to_y_up(points), stroke)
    assert abs(angle / DEG - skew_deg) < 0.2
    # level afterwards: a second estimate finds (almost) nothing left to correct
    _, residual = ih.correct_skew(levelled, stroke)
    assert abs(residual / DEG) < 0.2


# ---------------------------------------------------------------------------
# 3. Slant
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("slant_deg", [-15.0, 0.0, 20.0, 35.0])
def test_slant_of_a_sheared_line_is_recovered_and_down_strokes_come_back_vertical(slant_deg):
    upright = zigzag()
    sheared = upright.copy()
    sheared[:, 0] += np.tan(slant_deg * DEG) * upright[:, 1]
    stroke = np.zeros(len(upright), dtype=int)
    corrected, slant = ih.correct_slant(sheared, stroke)
    assert abs(slant / DEG - slant_deg) <= 0.5  # 1-degree bins centred on integers
    # the tooth's top and bottom are again one above the other
    top, bottom = 0, np.argmin(np.abs(upright[:, 1]) + np.abs(upright[:, 0]))
    assert abs(corrected[top, 0] - corrected[bottom, 0]) < 0.01


def test_slant_histogram_is_smoothed_with_quarter_half_quarter():
    # one vertical segment of length 1: a single bin of weight 1 spread 0.25, 0.5, 0.25
    centres, hist = ih.slant_histogram(np.array([[0.0, 0.0], [0.0, 1.0]]), np.zeros(2, int))
    assert np.allclose(hist[np.isin(centres, [-1, 0, 1])], [0.25, 0.5, 0.25])
    assert np.isclose(hist.sum(), 1.0)


# ---------------------------------------------------------------------------
# 4. Resampling
# ---------------------------------------------------------------------------

def test_resampled_points_are_evenly_spaced_along_the_ink_of_each_stroke():
    rng = np.random.default_rng(0)
    first = polyline([(0, 0), (3, 0), (3, 2), (5, 1)], step=0.37)  # corners, uneven steps
    first = first + rng.normal(0, 0.01, first.shape)
    second = polyline([(8, 0), (8, 3)], step=0.2)
    points = np.vstack([first, second])
    stroke = np.r_[np.zeros(len(first), int), np.ones(len(second), int)]
    new, new_stroke, frac = resample(points, stroke, spacing=0.1)
    # arc length of every new point, from its fractional index into the old polyline
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1) * (stroke[1:] == stroke[:-1])
    arc = np.r_[0.0, np.cumsum(seg)]
    i0 = np.minimum(np.floor(frac).astype(int), len(points) - 2)
    new_arc = arc[i0] + (frac - i0) * np.r_[seg, 0.0][i0]
    for k in (0, 1):
        gaps = np.diff(new_arc[new_stroke == k])
        assert np.allclose(gaps, gaps[0], atol=1e-9)  # even
        assert abs(gaps[0] - 0.1) < 0.05 / (len(gaps))  # and close to the spacing
    # strokes stay separate: no new point on the pen-up jump from x = 5 to x = 8
    assert np.all(new[new_stroke == 0, 0] <= 5.1) and np.all(new[new_stroke == 1, 0] > 7.9)
    assert np.allclose(new[new_stroke == 1, 0], 8.0, atol=1e-12)
    # ends are kept
    assert np.allclose(new[0], points[0]) and np.allclose(new[-1], points[-1])


def test_fractional_index_carries_a_per_point_quantity_to_the_new_points():
    # along a straight stroke, any quantity linear in x interpolates exactly
    points = polyline([(0, 0), (10, 0)], step=0.7)
    value = 3.0 * points[:, 0] + 1.0
    new, _, frac = resample(points, np.zeros(len(points), int), 0.25)
    carried = np.interp(frac, np.arange(len(points)), value)
    assert np.allclose(carried, 3.0 * new[:, 0] + 1.0)


def test_short_strokes_keep_their_ends_and_a_single_point_becomes_two_identical_points():
    # A zero-length stroke gets n = max(2, 0 + 1) = 2 points (the shared resample_strokes rule),
    # so every stroke, even a lone dot, has a first and a last point.
    points = np.array([[0.0, 0.0], [0.01, 0.0], [5.0, 5.0]])
    new, new_stroke, frac = resample(points, np.array([0, 0, 1]), spacing=1.0)
    assert new_stroke.tolist() == [0, 0, 1, 1]
    assert np.allclose(new, points[[0, 1, 2, 2]])
    assert np.allclose(frac, [0, 1, 2, 2])
    # a dot between two strokes: the strokes after it keep their own points
    points = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [7.0, 0.0], [8.0, 0.0]])
    new, new_stroke, frac = resample(points, np.array([0, 0, 1, 2, 2]), spacing=1.0)
    assert new_stroke.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.allclose(new, points[[0, 1, 2, 2, 3, 4]])
    assert np.allclose(frac, [0, 1, 2, 2, 3, 4])


# ---------------------------------------------------------------------------
# 5. Baseline, corpus line, height normalisation
# ---------------------------------------------------------------------------

def test_baseline_and_corpus_line_are_found_through_outlying_ascenders_and_descenders():
    # y-up arches between baseline y = 100 + 0.02 x and corpus line y = 150 + 0.02 x;
    # every fourth arch is an ascender (to y + 100), every fifth dips to a descender
    u = np.linspace(0, 1, 25)[:-1]
    parts = []
    for k in range(20):
        top = 100.0 if k % 4 == 3 else 50.0
        bottom = -50.0 if k % 5 == 4 else 0.0
        x = 40.0 * k + 40.0 * u
        wave = 0.5 * (1 - np.cos(2 * np.pi * u))  # 0 -> 1 -> 0
        y = np.where(u < 0.5, bottom * (1 - 2 * u), 0.0) + top * wave
        parts.append(np.column_stack([x, y]))
    points = np.vstack(parts)
    points[:, 1] += 100.0 + 0.02 * points[:, 0]
    stroke = np.zeros(len(points), int)
    baseline, corpus = ih.fit_baseline_and_corpus(points, stroke)
    assert abs(baseline.slope - 0.02) < 1e-3 and abs(baseline.intercept - 100.0) < 1.0
    assert abs(corpus.slope - 0.02) < 1e-3 and abs(corpus.intercept - 150.0) < 1.0
    normalised, height = ih.normalise_height(points, baseline, corpus)
    assert abs(height - 50.0) < 1.0
    minima, maxima = ih.local_extrema(normalised, stroke)
    body_minima = normalised[minima, 1][normalised[minima, 1] > -0.5]
    body_maxima = normalised[maxima, 1][normalised[maxima, 1] < 1.5]
    assert np.allclose(body_minima, 0.0, atol=0.02)
    assert np.allclose(body_maxima, 1.0, atol=0.02)
    assert np.isclose(normalised[:, 0].min(), 0.0)


def test_normalise_height_maps_known_lines_to_zero_and_one():
    points = np.array([[10.0, 20.0], [30.0, 60.0], [50.0, 40.0]])
    out, h = ih.normalise_height(points, ih.FittedLine(20.0, 0.0), ih.FittedLine(60.0, 0.0))
    assert h == 40.0
    assert np.allclose(out, [[0.0, 0.0], [0.5, 1.0], [1.0, 0.5]])
    with pytest.raises(ValueError, match="above the baseline"):
        ih.normalise_height(points, ih.FittedLine(60.0, 0.0), ih.FittedLine(20.0, 0.0))


def test_a_flat_line_falls_back_to_its_length_as_corpus_height():
    points = np.column_stack([np.arange(10.0), np.full(10, 3.0)])
    baseline, corpus = ih.fit_baseline_and_corpus(points, np.zeros(10, int))
    assert baseline == ih.FittedLine(3.0, 0.0) and corpus == ih.FittedLine(12.0, 0.0)


def test_preprocess_turns_y_down_input_into_y_up_output():
    word = zigzag(8)
    ascender = polyline([(8.5, 0.0), (8.5, 2.0)])
    up = np.vstack([word, ascender])
    stroke = np.r_[np.zeros(len(word), int), np.ones(len(ascender), int)]
    pre = ih.preprocess(to_sensor(up), stroke)
    assert pre.points[pre.stroke == 1, 1].max() > 1.5  # the ascender points up


# ---------------------------------------------------------------------------
# 6. Delayed strokes and hat
# ---------------------------------------------------------------------------

def test_delayed_dot_and_bar_are_removed_but_later_words_and_tall_strokes_stay():
    word = zigzag(6)  # x 0..7, y 0..1
    dot = np.array([[2.0, 1.5], [2.02, 1.52]])  # back over the word, high, tiny: delayed
    bar = polyline([(3.6, 1.05), (4.6, 1.1)])  # a t-bar: delayed
    next_word = zigzag(3) + [8.0, 0.0]  # to the right: written in order
    stem = polyline([(5.0, 0.0), (5.0, 2.0)])  # back over the ink, but 2 tall: kept
    parts = [word, dot, bar, next_word, stem]
    points = np.vstack(parts)
    stroke = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)])
    keep, hat_ranges = ih.remove_delayed_strokes(points, stroke)
    assert np.unique(stroke[~keep]).tolist() == [1, 2]
    assert np.allclose(hat_ranges, [[2.0, 2.02], [3.6, 4.6]])


def test_hat_is_one_under_a_removed_stroke_and_zero_elsewhere():
    x = np.array([0.0, 1.0, 2.85, 3.0, 3.15, 3.5, 5.0])
    hat = ih.hat_feature(x, np.array([[3.0, 3.0]]), margin=0.2)
    assert hat.tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_preprocess_removes_an_i_dot_and_marks_the_hat_under_it():
    word = zigzag(8)
    dot = np.array([[3.0, 1.6], [3.01, 1.61]])
    up = np.vstack([word, dot])
    stroke = np.r_[np.zeros(len(word), int), 1, 1]
    pre = ih.preprocess(to_sensor(up), stroke)
    assert pre.stroke.max() == 0 and len(pre.hat_ranges) == 1
    dot_x = pre.hat_ranges[0].mean()
    x = pre.points[:, 0]
    assert np.all(pre.hat[np.abs(x - dot_x) < 0.1] == 1.0)
    assert np.all(pre.hat[np.abs(x - dot_x) > 0.5] == 0.0)
    assert pre.hat.sum() > 0


# ---------------------------------------------------------------------------
# 7. preprocess as a whole
# ---------------------------------------------------------------------------

def test_preprocess_of_a_synthetic_line_gives_normalised_equidistant_ink():
    rng = np.random.default_rng(3)
    points, stroke, times = synthetic_line(rng, skew_deg=3.0, slant_deg=10.0)
    pre = ih.preprocess(points, stroke, times)
    n_words = 10
    assert pre.stroke.max() + 1 == n_words  # the 10 dots went to the hat
    assert len(pre.hat_ranges) == n_words
    assert abs(pre.skew / DEG - 3.0) < 0.5
    assert abs(np.log(pre.corpus_height / 120.0)) < 0.1  # the synthetic corpus is 120 px
    y = pre.points[:, 1]
    assert -1.2 < y.min() < -0.8 and 1.8 < y.max() < 2.2  # descenders -1, ascenders 2
    steps = np.linalg.norm(np.diff(pre.points, axis=0), axis=1)[pre.pen_up[1:] == 0]
    assert np.median(steps) == pytest.approx(ih.IAM_SPACING, rel=0.05)
    assert np.array_equal(pre.pen_up, ih.stroke_starts(pre.stroke).astype(float))
    assert not pre.points.flags.writeable


def test_speed_is_measured_before_resampling_in_corpus_heights_per_second():
    # a straight stroke at 2 corpus heights (200 px) per second, sampled every 20 ms and
    # resampled at another step; a vertical stroke over its middle gives the line a corpus
    # height of 100 px and leaves skew and slant at 0
    up = polyline([(0.0, 0.0), (6.0, 0.0)], step=0.04)
    up = np.vstack([up, polyline([(3.0, 0.0), (3.0, 1.0)], step=0.04)])
    stroke = np.r_[np.zeros(151, int), np.ones(len(up) - 151, int)]
    pre = ih.preprocess(to_sensor(up), stroke, np.arange(len(up)) * 0.02)
    assert pre.skew == 0.0 and pre.slant == 0.0 and np.isclose(pre.corpus_height, 100.0)
    assert np.allclose(pre.speed[pre.stroke == 0], 2.0)
    # central differences, one-sided at the ends: 5 units per 0.5 s
    assert np.allclose(ih.point_speed(np.array([[0.0, 0], [3, 4], [6, 8]]), np.zeros(3, int),
                                     np.array([0.0, 0.5, 1.0])), 10.0)


# ---------------------------------------------------------------------------
# Features on hand-worked cases
# ---------------------------------------------------------------------------

def feature(x25, name):
    return x25[:, ih.GRAVES25_NAMES.index(name)]


def test_names_are_25_and_unique():
    assert len(ih.GRAVES25_NAMES) == 25 == len(set(ih.GRAVES25_NAMES))


def test_horizontal_rightward_line_direction_curvature_and_vicinity():
    x25 = ih.features_graves25(make_pre(polyline([(0, 0.5), (3, 0.5)], step=0.15)))
    assert np.allclose(feature(x25, "dir_cos"), 1) and np.allclose(feature(x25, "dir_sin"), 0)
    assert np.allclose(feature(x25, "curv_cos"), 1) and np.allclose(feature(x25, "curv_sin"), 0)
    assert np.allclose(feature(x25, "vic_aspect"), -1)
    assert np.allclose(feature(x25, "vic_slope_cos"), 1)
    assert np.allclose(feature(x25, "vic_slope_sin"), 0)
    assert np.allclose(feature(x25, "vic_curliness"), 1)
    assert np.allclose(feature(x25, "vic_linearity"), 0, atol=1e-20)


def test_vertical_upward_line_has_aspect_plus_one_and_direction_up():
    x25 = ih.features_graves25(make_pre(polyline([(0.3, 0), (0.3, 2)], step=0.15)))
    assert np.allclose(feature(x25, "vic_aspect"), 1)
    assert np.allclose(feature(x25, "dir_cos"), 0) and np.allclose(feature(x25, "dir_sin"), 1)
    assert np.allclose(feature(x25, "vic_slope_sin"), 1)
    assert np.allclose(feature(x25, "vic_curliness"), 1)


def test_circle_has_constant_curvature_equal_to_the_turning_angle():
    n = 60
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x25 = ih.features_graves25(make_pre(np.column_stack([np.cos(a), np.sin(a)])))
    inner = slice(1, n - 1)  # curvature is (1, 0) at the stroke's ends by definition
    assert np.allclose(feature(x25, "curv_cos")[inner], np.cos(2 * np.pi / n))
    assert np.allclose(feature(x25, "curv_sin")[inner], np.sin(2 * np.pi / n))  # left turn
    # and a curled vicinity: longer than its extent, off its chord
    assert np.all(feature(x25, "vic_curliness")[3:-3] > 1)
    assert np.all(feature(x25, "vic_linearity")[3:-3] > 0)


def test_linearity_of_a_right_angle_is_the_mean_squared_distance_to_its_chord():
    # vicinity of the corner point: (0,3) (0,2) (0,1) (0,0) (1,0) (2,0) (3,0)
    corner = np.array([[0, 3], [0, 2], [0, 1], [0, 0], [1, 0], [2, 0], [3, 0]], dtype=float)
    vic = ih.vicinity_features(corner, np.zeros(7, int), half=3)[3]
    # chord from (0,3) to (3,0): distance of (a, b) is |a + b - 3| / sqrt(2)
    d2 = (corner.sum(axis=1) - 3) ** 2 / 2
    assert np.isclose(vic[4], d2.mean())
    assert np.isclose(vic[3], 6 / 3)  # curliness: path 6 over extent 3
    assert np.isclose(vic[0], 0.0)  # aspect: square bounding box


def test_ascenders_and_descenders_count_points_beyond_the_lines_near_x():
    points = np.array([[0.0, 0.5], [0.1, 1.8], [0.2, 1.2], [0.3, -0.7], [2.0, 1.9]])
    counts = ih.zone_counts(points, margin=0.3, x_radius=0.5)
    # near x = 0: one point above 1.3 (y = 1.8; 1.2 is inside the margin), one below -0.3
    assert counts[0].tolist() == [1, 1]
    assert counts[4].tolist() == [1, 0]  # far right: only itself


def test_context_map_counts_a_hand_made_bitmap():
    cell = 0.5
    points = np.array([[0.1, 0.1], [0.2, 0.2], [0.6, 0.1], [0.1, 0.6], [-0.4, -0.4], [3, 3]])
    ctx = ih.context_map(points, cell)
    # first point's pixel (0, 0) holds 2 points; right (1, 0): 1; top (0, 1): 1;
    # bottom-left (-1, -1): 1; the point at (3, 3) is outside the 3x3 block
    expected = np.array([[0, 1, 0],
                         [0, 2, 1],
                         [1, 0, 0]])
    assert np.array_equal(ctx[0].reshape(3, 3), expected)
    assert ctx[5].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]


def test_context_map_counts_sum_to_the_points_in_the_3x3_block():
    rng = np.random.default_rng(2)
    points = rng.uniform([0, -1], [6, 2], size=(300, 2))
    ctx = ih.context_map(points, 0.5)
    pixel = np.floor(points / 0.5)
    near = np.all(np.abs(pixel[:, None, :] - pixel[None, :, :]) <= 1, axis=2)  # (T, T)
    assert np.array_equal(ctx.sum(axis=1), near.sum(axis=1))
    # the centre cell summed over all points counts every pixel's points squared
    _, per_pixel = np.unique(pixel, axis=0, return_counts=True)
    assert ctx[:, 4].sum() == (per_pixel ** 2).sum()


def test_pen_up_marks_stroke_starts_and_raw_features_rebuild_the_trajectory():
    points = np.array([[0, 0], [1, 0], [2, 0], [5, 1], [6, 1]], dtype=float)
    pre = make_pre(points, np.array([0, 0, 0, 1, 1]))
    x25 = ih.features_graves25(pre)
    assert feature(x25, "pen_up").tolist() == [1, 0, 0, 1, 0]
    raw = ih.pen_trajectory(pre.points, pre.stroke)
    assert raw.shape == (5, 3) and np.all(raw[0, :2] == 0)
    assert np.allclose(np.cumsum(raw[:, :2], axis=0) + points[0], points)
    assert raw[:, 2].tolist() == [1, 0, 0, 1, 0]


def test_x_highpass_removes_the_local_mean():
    x = np.linspace(0, 30, 200)  # constant speed: the centred mean equals x itself
    x25 = ih.features_graves25(make_pre(np.column_stack([x, np.full(200, 0.5)])))
    h = ih.X_HIGHPASS_HALF
    assert np.allclose(feature(x25, "x_highpass")[h:-h], 0, atol=1e-9)
    assert feature(x25, "x_highpass")[0] < 0 < feature(x25, "x_highpass")[-1]


# ---------------------------------------------------------------------------
# Vectorised features equal plain per-point loops
# ---------------------------------------------------------------------------

def loop_vicinity(points, stroke, half):
    rows = []
    for t in range(len(points)):
        same = np.flatnonzero(stroke == stroke[t])
        window = [j for j in range(t - half, t + half + 1) if j in same]
        v = points[window]
        dx, dy = np.ptp(v[:, 0]), np.ptp(v[:, 1])
        chord = v[-1] - v[0]
        length = np.hypot(*chord)
        path = sum(np.hypot(*(v[i + 1] - v[i])) for i in range(len(v) - 1))
        if length > 0:
            d2 = [((p - v[0])[0] * chord[1] - (p - v[0])[1] * chord[0]) ** 2 / length ** 2
                  for p in v]
        else:
            d2 = [np.sum((p - v[0]) ** 2) for p in v]
        rows.append([
            (dy - dx) / (dy + dx) if dy + dx > 0 else 0.0,
            chord[0] / length if length > 0 else 0.0,
            chord[1] / length if length > 0 else 0.0,
            path / max(dx, dy) if max(dx, dy) > 0 else 1.0,
            np.mean(d2),
        ])
    return np.array(rows)


def random_strokes(rng, lengths):
    stroke = np.repeat(np.arange(len(lengths)), lengths)
    return np.cumsum(rng.normal(0, 0.2, (len(stroke), 2)), axis=0), stroke


def test_vicinity_features_equal_a_per_point_loop():
    rng = np.random.default_rng(4)
    points, stroke = random_strokes(rng, [1, 2, 5, 40, 3])
    points[30] = points[29]  # a zero-length step
    for half in (1, 3):
        assert np.allclose(ih.vicinity_features(points, stroke, half),
                           loop_vicinity(points, stroke, half))


def test_direction_curvature_and_zone_counts_equal_per_point_loops():
    rng = np.random.default_rng(5)
    points, stroke = random_strokes(rng, [1, 4, 30])
    direction, curv = ih.writing_direction(points, stroke), ih.curvature(points, stroke)
    counts = ih.zone_counts(points, 0.3, 0.5)
    for t in range(len(points)):
        same = np.flatnonzero(stroke == stroke[t])
        prev, nxt = max(t - 1, same[0]), min(t + 1, same[-1])
        d = points[nxt] - points[prev]
        assert np.allclose(direction[t], d / np.hypot(*d) if np.hypot(*d) > 0 else 0)
        u, v = points[t] - points[prev], points[nxt] - points[t]
        if np.hypot(*u) * np.hypot(*v) > 0:
            angle = np.arctan2(v[1], v[0]) - np.arctan2(u[1], u[0])
            assert np.allclose(curv[t], [np.cos(angle), np.sin(angle)])
        else:
            assert np.allclose(curv[t], [1, 0])
        near = np.abs(points[:, 0] - points[t, 0]) <= 0.5
        assert counts[t, 0] == np.sum(near & (points[:, 1] > 1.3))
        assert counts[t, 1] == np.sum(near & (points[:, 1] < -0.3))


# ---------------------------------------------------------------------------
# Degenerate lines
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, points, stroke", [
    ("one point", [[5.0, 5.0]], [0]),
    ("two points", [[5.0, 5.0], [8.0, 9.0]], [0, 0]),
    ("identical points", [[5.0, 5.0]] * 30, [0] * 30),
    ("two single-point strokes far apart", [[0.0, 0.0], [900.0, 900.0]], [0, 1]),
    ("vertical only", np.column_stack([np.full(40, 7.0), np.arange(40.0)]), [0] * 40),
    ("horizontal only", np.column_stack([np.arange(40.0), np.full(40, 7.0)]), [0] * 40),
    ("one stroke", to_sensor(zigzag(5)), [0] * len(zigzag(5))),
])
def test_degenerate_lines_give_finite_features(name, points, stroke):
    pre = ih.preprocess(np.asarray(points, dtype=float), np.asarray(stroke), None)
    x25, raw = ih.features_graves25(pre), ih.pen_trajectory(pre.points, pre.stroke)
    assert len(pre.points) >= 2 and np.all(np.bincount(pre.stroke) >= 2)  # a dot is 2 identical points
    assert x25.shape == (len(pre.points), 25) and raw.shape == (len(pre.points), 3)
    assert np.all(np.isfinite(x25)) and np.all(np.isfinite(raw)), name
    assert pre.pen_up[0] == 1.0


def test_synthetic_lines_give_finite_features_of_the_right_shape():
    rng = np.random.default_rng(6)
    for _ in range(5):
        pre = ih.preprocess(*synthetic_line(rng, skew_deg=rng.uniform(-8, 8),
                                             slant_deg=rng.uniform(-30, 40)))
        x25 = ih.features_graves25(pre)
        assert x25.shape == (len(pre.points), 25) and np.all(np.isfinite(x25))
