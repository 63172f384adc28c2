"""Tests for the figure and GIF scripts, run against a real --quick run.json.

One quick training run (about 4 s) is shared by the whole module; each script
then runs once on it in a subprocess, plus once per bad input.
"""
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from matplotlib.text import Text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import iam_handwriting as ih  # noqa: E402
import make_iam_handwriting_gif as gif_script  # noqa: E402
import visualize_iam_handwriting as viz  # noqa: E402

SCRIPTS = ("visualize_iam_handwriting.py", "make_iam_handwriting_gif.py")
PNGS = ("alphabet.png", "word_renderings.png", "training_curves.png", "ctc_alignment.png",
        "ctc_alignment_long.png", "confusion_chars.png", "lexicon_size.png")
E = viz.EMPTY


def run_script(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def fake_decoding():
    """A `decoding` block as the later iam_handwriting.py change will write it."""
    sizes, rows = [47, 100, 1000, 10000], []
    for n in sizes:
        for split, acc in (("in_vocab", 0.9), ("held_out", 0.7)):
            for decoder, bonus, sec in (("greedy", 0.0, 1e-4), ("beam", 0.01, 1e-3), ("lexicon", 0.08, 1e-6 * n)):
                rows.append({"lexicon_size": n, "decoder": decoder, "split": split, "cer": 0.05,
                             "word_acc": acc + bonus - (0.02 * np.log10(n) if decoder == "lexicon" else 0.0),
                             "seconds_per_word": sec})
    return {"lexicon_sizes": sizes, "beam_width": 16, "rows": rows, "seconds": 1.0}


@pytest.fixture(scope="module")
def run_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "run.json"
    r = subprocess.run([sys.executable, "iam_handwriting.py", "--quick", "--quiet", "--save-json", str(path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="module")
def run_json_with_decoding(run_json):
    doc = json.loads(run_json.read_text())
    doc["decoding"] = fake_decoding()
    path = run_json.with_name("run_with_decoding.json")
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def viz_dir(run_json_with_decoding, tmp_path_factory):
    out = tmp_path_factory.mktemp("figs") / "viz" / "nested"  # does not exist yet
    r = run_script("visualize_iam_handwriting.py", run_json_with_decoding, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def gif_path(run_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("gif") / "reading.gif"
    r = run_script("make_iam_handwriting_gif.py", run_json, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


# ---------------------------------------------------------------------------
# Figures and GIF are written and look like pictures
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", PNGS)
def test_every_png_is_written_decodes_and_is_not_blank(viz_dir, name):
    img = iio.imread(viz_dir / name)  # (H, W, C)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 500, img.shape
    grey = img[..., :3].astype(float).mean(axis=-1)
    assert grey.std() > 10.0  # a blank or single-colour canvas has std ~0


def test_figure_folder_holds_only_the_pngs_no_temporary_files(viz_dir):
    assert sorted(os.listdir(viz_dir)) == sorted(PNGS)


def test_lexicon_plot_is_made_only_when_run_json_has_decoding(run_json, run_json_with_decoding):
    names = [n for n, _ in viz.figures(viz.load_run(run_json))]
    names_dec = [n for n, _ in viz.figures(viz.load_run(run_json_with_decoding))]
    assert "lexicon_size.png" not in names
    assert names_dec == names + ["lexicon_size.png"]


def test_training_curves_without_history_say_so_in_the_figure(run_json):
    run = viz.load_run(run_json)
    run["history"] = []
    fig = viz.fig_training_curves(run)
    assert any("No training history" in t.get_text() for t in fig.findobj(Text))


def test_gif_has_one_frame_per_shown_step_loops_holds_last_frame_and_is_under_2_mb(gif_path, run_json):
    frames = iio.imread(gif_path, index=None)  # (N, H, W, 3)
    T = len(json.loads(run_json.read_text())["alignments"][1]["xy"])
    assert len(frames) == len(gif_script.frame_steps(T)) > 1
    assert gif_path.stat().st_size <= 2_000_000
    assert not np.array_equal(frames[0], frames[-1])
    first, last = iio.immeta(gif_path, index=0), iio.immeta(gif_path, index=len(frames) - 1)
    assert first["loop"] == 0  # 0 = loop forever
    assert 60 <= first["duration"] <= 100  # about 10-16 frames per second
    assert last["duration"] == gif_script.HOLD_MS


def test_frame_steps_cover_the_word_and_end_on_its_last_step():
    for T in (1, 5, 79, 120, 121, 500):
        steps = gif_script.frame_steps(T)
        assert steps[0] == 0 and steps[-1] == T - 1
        assert len(steps) <= gif_script.MAX_FRAMES + 1
        assert all(b > a for a, b in zip(steps, steps[1:]))


def test_running_decode_of_the_whole_word_equals_run_json_decoded(run_json):
    for a in viz.load_run(run_json)["alignments"]:
        assert viz.greedy_string(a["log_probs"]) == a["decoded"]


# ---------------------------------------------------------------------------
# Character confusion counting
# ---------------------------------------------------------------------------


def as_dict(matrix, labels):
    return {(labels[i], labels[j]): int(matrix[i, j]) for i, j in zip(*np.nonzero(matrix))}


def test_confusion_counts_match_hand_worked_alignments():
    # ant|an: a-a n-n t-del;  ant|aint: a-a ins-i n-n t-t;  ant|ent: a-e n-n t-t;  ant|'': three deletions
    m, labels = viz.confusion_counts([("ant", "an"), ("ant", "aint"), ("ant", "ent"), ("ant", "")])
    assert labels == list(ih.ALPHABET) + [E]
    assert as_dict(m, labels) == {("a", "a"): 2, ("n", "n"): 3, ("t", "t"): 2, ("t", E): 2, (E, "i"): 1,
                                  ("a", "e"): 1, ("a", E): 1, ("n", E): 1}
    assert m.sum() == 3 + 4 + 3 + 3  # aligned pairs


def test_confusion_counts_of_identical_strings_are_diagonal():
    m, labels = viz.confusion_counts([("moon", "moon"), ("tonic", "tonic")])
    assert as_dict(m, labels) == {("m", "m"): 1, ("o", "o"): 3, ("n", "n"): 2, ("t", "t"): 1, ("i", "i"): 1,
                                  ("c", "c"): 1}


def test_confusion_counts_give_characters_outside_the_alphabet_their_own_label():
    m, labels = viz.confusion_counts([("ab", "ax")])
    assert labels == list(ih.ALPHABET) + ["b", "x", E]
    assert as_dict(m, labels) == {("a", "a"): 1, ("b", "x"): 1}


def test_confusion_margins_count_every_reference_and_decoded_character(run_json):
    # Checked against independent counts: each reference character lands in exactly one row
    # cell, each decoded character in exactly one column cell, and off-diagonal cells are edits.
    rng = np.random.default_rng(0)
    random_pairs = [("".join(rng.choice(list("cat"), rng.integers(0, 6))),
                     "".join(rng.choice(list("cot"), rng.integers(0, 6)))) for _ in range(200)]
    preds = [(p["word"], p["decoded"]) for p in json.loads(run_json.read_text())["predictions"]]
    for pairs in (random_pairs, preds):
        m, labels = viz.confusion_counts(pairs)
        refs = collections.Counter("".join(r for r, _ in pairs))
        hyps = collections.Counter("".join(h for _, h in pairs))
        assert dict(zip(labels[:-1], m[:-1].sum(axis=1))) == {c: refs.get(c, 0) for c in labels[:-1]}
        assert dict(zip(labels[:-1], m[:, :-1].sum(axis=0))) == {c: hyps.get(c, 0) for c in labels[:-1]}
        assert m.sum() == sum(len(ih.edit_alignment(r, h)) for r, h in pairs)
        assert m.sum() - np.trace(m[:-1, :-1]) == sum(ih.levenshtein(r, h) for r, h in pairs)


# ---------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback
# ---------------------------------------------------------------------------


def bad_inputs(run_json, tmp):
    """(name, run.json path, output path) per kind of bad input."""
    doc = json.loads(run_json.read_text())
    (tmp / "corrupt.json").write_text('{"schema_version": 1, "config": ')
    (tmp / "no_keys.json").write_text(json.dumps({"schema_version": 1, "config": doc["config"]}))
    (tmp / "v2.json").write_text(json.dumps({**doc, "schema_version": 2}))
    (tmp / "a_file").write_text("not a folder")
    return {
        "missing": (tmp / "nope.json", tmp / "out"),
        "corrupt_json": (tmp / "corrupt.json", tmp / "out"),
        "missing_keys": (tmp / "no_keys.json", tmp / "out"),
        "wrong_schema_version": (tmp / "v2.json", tmp / "out"),
        "output_under_a_regular_file": (run_json, tmp / "a_file" / "sub"),
    }


EXPECTED_WORDS = {"missing": "--save-json run.json", "corrupt_json": "not valid JSON",
                  "missing_keys": "missing required keys", "wrong_schema_version": "schema_version 2",
                  "output_under_a_regular_file": "a_file"}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", sorted(EXPECTED_WORDS))
def test_bad_input_exits_2_with_one_stderr_line_and_no_traceback(script, case, run_json, tmp_path):
    path, out = bad_inputs(run_json, tmp_path)[case]
    if script.startswith("make"):
        out = out / "x.gif"
    r = run_script(script, path, "--out", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert EXPECTED_WORDS[case] in lines[0]
    assert not out.exists()
