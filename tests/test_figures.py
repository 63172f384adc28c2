"""Tests for the figure and GIF scripts, run against real run.json files.

Two small training runs (words, lines) are made once, side by side, for the
whole module, and the figure script runs once on each in a subprocess. The
decoding blocks are fakes in run.json's schema: the real lexicon experiment
costs seconds of beam search, and the module does not write the lines one yet.
Every other test builds figures in memory and checks the plotted data against
run.json, computed independently where it can be, so that a figure that loses
a curve, a box or a bar fails a test.
"""
import collections
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import iam_handwriting as ih  # noqa: E402
import make_iam_handwriting_gif as gif_script  # noqa: E402
import visualize_iam_handwriting as viz  # noqa: E402

E = viz.EMPTY
TASKS = ("words", "lines")
EXPECTED_PNGS = {
    "words": ["alphabet.png", "word_renderings.png", "training_curves.png", "ctc_alignment.png",
              "ctc_alignment_long.png", "confusion_chars.png", "lexicon_size.png"],
    "lines": ["six_writers.png", "training_curves.png", "ctc_alignment.png", "ctc_alignment_long.png",
              "per_writer_cer.png", "confusion_chars.png"],  # the lines run has no decoding block
}
RUN_ARGS = {  # small and fast: the figures need real shapes and values, not a trained model
    "words": ["--quick", "--epochs", "2"],
    "lines": ["--task", "lines", "--quick", "--epochs", "1", "--lines-per-epoch", "16", "--workers", "1"],
}
STALE = {"dictionary_size.png": b"an old dictionary figure", "alphabet.png": b"an old words figure",
         "notes.txt": b"the user's own file"}


def script_cmd(script, *args):
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run_chains(chains):
    """Run chains of commands side by side, each chain's commands one after the
    other, stopping at a failure. Returns each chain's CompletedProcess list."""
    def chain(cmds):
        done = []
        for cmd in cmds:
            done.append(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300))
            if done[-1].returncode != 0:
                break
        return done
    with ThreadPoolExecutor(len(chains)) as pool:
        return list(pool.map(chain, chains))


def fake_lexicon_decoding():
    """A words `decoding` block as lexicon_experiment writes it (the real one costs seconds of beam search)."""
    sizes, rows = [47, 100, 1000], []
    for n in sizes:
        for split, acc in (("in_vocab", 0.9), ("held_out", 0.7)):
            for decoder, bonus, sec in (("greedy", 0.0, 1e-5), ("beam", 0.01, 1e-3), ("lexicon", 0.08, 1e-6 * n)):
                word_acc = acc + bonus - (0.02 * np.log10(n) if decoder == "lexicon" else 0.0)
                rows.append({"size": n, "decoder": decoder, "split": split, "cer": (1 - word_acc) / 4,
                             "wer": 1 - word_acc, "word_acc": word_acc, "seconds_per_seq": sec, "n": 300})
    return {"kind": "lexicon", "sizes": sizes, "beam_width": 16, "rows": rows, "seconds": 1.0}


def fake_dictionary_decoding():
    """A lines `decoding` block in the shape the module writes (every WER above zero)."""
    sizes, rows = [1000, 5000, 20000], []
    for n in sizes:
        oov = 0.12 / np.log10(n)
        for decoder, wer in (("greedy", 0.31), ("dictionary", 0.24 + 0.01 * np.log10(n)),
                             ("unigram", 0.2 + 0.004 * np.log10(n)), ("bigram", 0.17 - 0.006 * np.log10(n))):
            rows.append({"size": n, "decoder": decoder, "split": "test", "cer": wer / 3, "wer": wer,
                         "word_acc": 1 - wer, "seconds_per_seq": 1e-6 * n, "n": 80, "oov_rate": oov,
                         "oov_word_errors": int(round(oov * 400)), "lm_weight": 1.0, "word_penalty": 0.0})
    perplexity = {str(n): {"unigram": 700.0 + n / 50, "bigram": 250.0 + n / 200} for n in sizes}
    return {"kind": "dictionary", "sizes": sizes, "rows": rows, "perplexity": perplexity, "seconds": 2.0}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per task, side by side: a small training run, then the figure script on
    its run.json. The words run.json gets a lexicon experiment first, so the
    script draws lexicon_size.png; the lines figure folder already holds stale
    figures of other runs and a file of the user's. Returns ({'words', 'lines',
    'lines_dec': run.json path}, {task: (figure folder, stdout)})."""
    root = tmp_path_factory.mktemp("made")
    paths = {task: root / f"{task}.json" for task in TASKS}
    dirs = {"words": root / "words" / "nested", "lines": root / "lines"}  # words: does not exist yet
    dirs["lines"].mkdir()
    for name, data in STALE.items():
        (dirs["lines"] / name).write_bytes(data)
    (root / "lexicon.json").write_text(json.dumps(fake_lexicon_decoding()))
    add_lexicon = [sys.executable, "-c", "import json, sys; run, dec = sys.argv[1:]; d = json.load(open(run)); "
                   "assert 'decoding' not in d; d['decoding'] = json.load(open(dec)); json.dump(d, open(run, 'w'))",
                   str(paths["words"]), str(root / "lexicon.json")]
    chains = [[[sys.executable, "iam_handwriting.py", *RUN_ARGS[t], "--quiet", "--save-json", str(paths[t])],
               *([add_lexicon] if t == "words" else []),
               script_cmd("visualize_iam_handwriting.py", paths[t], "--out", dirs[t])] for t in TASKS]
    outputs = {}
    for t, done in zip(TASKS, run_chains(chains)):
        assert [r.returncode for r in done] == [0] * len(chains[TASKS.index(t)]), f"{t}: {done[-1].stderr}"
        assert done[-1].stderr == "", done[-1].stderr  # no warnings either
        outputs[t] = (dirs[t], done[-1].stdout)
    doc = json.loads(paths["lines"].read_text())
    paths["lines_dec"] = root / "lines_dec.json"
    paths["lines_dec"].write_text(json.dumps({**doc, "decoding": fake_dictionary_decoding()}))
    return paths, outputs


@pytest.fixture(scope="module")
def run_files(made):
    return made[0]


@pytest.fixture(scope="module")
def figure_dirs(made):
    return made[1]


@pytest.fixture(scope="module")
def docs(run_files):
    return {name: json.loads(p.read_text()) for name, p in run_files.items()}


@pytest.fixture(scope="module")
def runs(run_files):
    return {name: viz.load_run(p) for name, p in run_files.items()}


def by_gid(fig, gid):
    return [a for a in fig.findobj() if a.get_gid() == gid]


def one(fig, gid):
    found = by_gid(fig, gid)
    assert len(found) == 1, f"{len(found)} artists with gid {gid!r}"
    return found[0]


def texts(fig):
    return [t.get_text() for t in fig.findobj(Text)]


# ---------------------------------------------------------------------------
# The figure set per task, written, decodable, and nothing else touched
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_each_task_writes_exactly_its_figure_set_and_no_temporary_files(figure_dirs, task):
    folder, stdout = figure_dirs[task]
    written = sorted(set(os.listdir(folder)) - set(STALE if task == "lines" else ()))
    assert written == sorted(EXPECTED_PNGS[task])
    assert [line.split("/")[-1] for line in stdout.splitlines() if line.startswith("wrote ")] == EXPECTED_PNGS[task]


@pytest.mark.parametrize("task,name", [(t, n) for t in TASKS for n in EXPECTED_PNGS[t]])
def test_every_png_decodes_and_is_not_blank(figure_dirs, task, name):
    img = iio.imread(figure_dirs[task][0] / name)  # (H, W, C)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 500, img.shape
    assert img[..., :3].astype(float).mean(axis=-1).std() > 10.0  # a blank canvas has std ~0


def test_known_figures_this_run_does_not_make_are_kept_and_named_user_files_ignored(figure_dirs):
    folder, stdout = figure_dirs["lines"]
    for name, data in STALE.items():
        assert (folder / name).read_bytes() == data  # nothing deleted or overwritten
    stale_lines = [line for line in stdout.splitlines() if line.startswith("not updated")]
    assert len(stale_lines) == 2
    assert any("dictionary_size.png" in line and "no decoding block" in line for line in stale_lines)
    assert any("alphabet.png" in line and "words task" in line for line in stale_lines)
    assert "notes.txt" not in stdout


def test_figure_set_depends_on_task_and_decoding(runs):
    names = {k: [n for n, _ in viz.figures(r)] for k, r in runs.items()}
    assert names["words"] == EXPECTED_PNGS["words"]
    assert names["lines"] == EXPECTED_PNGS["lines"]
    assert names["lines_dec"] == EXPECTED_PNGS["lines"] + ["dictionary_size.png"]
    no_dec = {k: v for k, v in runs["words"].items() if k != "decoding"}
    assert [n for n, _ in viz.figures(no_dec)] == EXPECTED_PNGS["words"][:-1]


def test_iam_ondb_run_without_character_positions_draws_without_spans(runs):
    run = {**runs["lines"], "task": {**runs["lines"]["task"], "name": "iam-ondb"},
           "alignments": [{**a, "char_of": None, "writer": "w0042"} for a in runs["lines"]["alignments"]]}
    run.pop("six_writers_text")
    assert [n for n, _ in viz.figures(run)] == [n for n in EXPECTED_PNGS["lines"] if n != "six_writers.png"]
    fig = viz.fig_ctc_alignment(run, 1)
    assert by_gid(fig, "span") == []
    assert np.allclose(one(fig, "softmax").get_array(), np.exp(run["alignments"][1]["log_probs"]).T)
    assert any("not known" in t for t in texts(fig))


def test_the_reader_takes_the_run_json_of_an_iam_ondb_run(tmp_path):
    """The writer and the reader cannot drift for any task: the words and lines run.json files
    of `made` go through load_run in every test here; an iam-ondb one, of the IAM-OnDB tests'
    six-line reference folder, does here."""
    from test_iamondb_io import write_reference_db
    out = tmp_path / "iam.json"
    (r,) = run_chains([[script_cmd("iam_handwriting.py", "--task", "iam-ondb", "--data-dir",
                                   write_reference_db(tmp_path / "db"), "--quick", "--epochs", "1", "--workers", "1",
                                   "--quiet", "--save-json", out)]])[0]
    assert r.returncode == 0, r.stderr
    run = viz.load_run(out)
    assert run["task"]["name"] == "iam-ondb" and run["task"]["splits"] == ["validation", "validation2", "test"]
    assert [n for n, _ in viz.figures(run)] == [n for n in EXPECTED_PNGS["lines"] if n != "six_writers.png"]


# ---------------------------------------------------------------------------
# Plotted data equals run.json
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_training_curve_lines_are_the_history_values_and_the_x_axis_ends_at_the_last_epoch(runs, docs, task):
    run, hist = runs[task], docs[task]["history"]
    fig = viz.fig_training_curves(run)
    epochs = [e["epoch"] for e in hist]
    expected = {"loss:train": [e["train_loss"] for e in hist]}
    for split in docs[task]["task"]["monitor"]:
        for key in ("loss", "cer", "wer"):
            expected[f"{key}:{split}"] = [e[split][key] for e in hist]
    plotted = {a.get_gid(): a for a in fig.findobj(Line2D) if a.get_gid()}
    assert set(plotted) == set(expected)
    for gid, ys in expected.items():
        assert list(plotted[gid].get_xdata()) == epochs
        assert np.allclose(plotted[gid].get_ydata(), ys), gid
    for ax in fig.axes:
        assert ax.get_xlim()[1] <= epochs[-1] + 0.5  # end labels sit in the margin, not on an extended axis


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("index", [0, 1])
def test_heat_map_is_exp_log_probs_and_each_true_character_run_is_outlined(runs, docs, task, index):
    rec, alphabet = docs[task]["alignments"][index], docs[task]["task"]["alphabet"]
    fig = viz.fig_ctc_alignment(runs[task], index)
    assert np.allclose(one(fig, "softmax").get_array(), np.exp(np.array(rec["log_probs"])).T)
    # Runs of consecutive samples of one character, found by walking the samples.
    expected, start = set(), 0
    char_of = rec["char_of"]
    for t in range(1, len(char_of) + 1):
        if t == len(char_of) or char_of[t] != char_of[start]:
            k = 1 + alphabet.index(rec["text"][char_of[start]])
            expected.add((start - 0.5, k - 0.5, t - start))
            start = t
    boxes = {(r.get_x(), r.get_y(), r.get_width()) for r in by_gid(fig, "span")}
    assert boxes == expected
    assert all(isinstance(r, Rectangle) and not r.get_fill() for r in by_gid(fig, "span"))  # outlines


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("index", [0, 1])
def test_argmax_path_letters_are_the_greedy_decode_at_each_new_run(runs, docs, task, index):
    rec = docs[task]["alignments"][index]
    fig = viz.fig_ctc_alignment(runs[task], index)
    letters = by_gid(fig, "path-char")
    path = rec["argmax_path"]
    starts = [t for t, k in enumerate(path) if k != ih.BLANK and (t == 0 or path[t - 1] != k)]
    assert [t.get_position()[0] for t in letters] == starts
    assert "".join(t.get_text() for t in letters).replace(viz.SPACE, " ") == rec["decoded"]


@pytest.mark.parametrize("task", TASKS)
def test_ink_panel_draws_each_pen_down_step_in_its_characters_colour(runs, docs, task):
    rec = docs[task]["alignments"][1]
    fig = viz.fig_ctc_alignment(runs[task], 1)
    ink = fig.axes[0].findobj(lambda a: a.get_gid() == "ink")[0]
    down = [t for t in range(1, len(rec["xy"])) if rec["pen_up"][t] == 0.0]
    segs = ink.get_segments()
    assert len(segs) == len(down)
    assert np.allclose([s[1] for s in segs], [rec["xy"][t] for t in down])
    expected = [viz.CHAR_COLOURS[rec["char_of"][t] % 10] for t in down]
    assert np.allclose(ink.get_colors()[:, :3], expected)


def test_per_writer_bars_are_the_per_writer_cers_sorted_with_the_split_cer(runs, docs):
    fig = viz.fig_per_writer_cer(runs["lines"])
    for split in ("validation", "test"):
        writers = sorted((g["cer"], name) for name, g in docs["lines"]["per_writer"].items() if g["split"] == split)
        bars = by_gid(fig, f"bars:{split}")
        assert len(bars) == len(writers) == ih.LINE_WRITERS[split]
        assert np.allclose([b.get_height() for b in bars], [c for c, _ in writers])
        ax = bars[0].axes
        assert [t.get_text() for t in ax.get_xticklabels()] == [name for _, name in writers]
        assert one(fig, f"split-cer:{split}").get_ydata()[0] == docs["lines"]["final"][split]["cer"]


@pytest.mark.parametrize("task", TASKS)
def test_confusion_image_counts_every_reference_and_decoded_character(runs, docs, task):
    fig = viz.fig_confusion(runs[task])
    alphabet = docs[task]["task"]["alphabet"]
    for split in docs[task]["task"]["splits"]:
        pairs = [(p["text"], p["decoded"]) for p in docs[task]["predictions"] if p["split"] == split]
        m = np.ma.filled(one(fig, f"confusion:{split}").get_array(), 0).astype(int)
        labels = list(alphabet) + sorted({c for r, h in pairs for c in r + h} - set(alphabet))
        refs = collections.Counter("".join(r for r, _ in pairs))
        hyps = collections.Counter("".join(h for _, h in pairs))
        assert list(m[:-1].sum(axis=1)) == [refs[c] for c in labels]
        assert list(m[:, :-1].sum(axis=0)) == [hyps[c] for c in labels]
        assert m.sum() - np.trace(m[:-1, :-1]) == sum(ih.levenshtein(r, h) for r, h in pairs)


def test_lexicon_plot_points_are_the_decoding_rows_on_an_accuracy_axis_fitted_to_them(runs, docs):
    fig = viz.fig_lexicon_size(runs["words"])
    ax_acc, ax_time = fig.axes[:2]
    rows = docs["words"]["decoding"]["rows"]
    keys = {(r["decoder"], r["split"]) for r in rows}
    for ax, value in ((ax_acc, lambda r: r["word_acc"]), (ax_time, lambda r: 1e3 * r["seconds_per_seq"])):
        lines = {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}
        assert set(lines) == {f"{d}:{s}" for d, s in keys}
        for d, s in keys:
            pts = sorted((r["size"], value(r)) for r in rows if r["decoder"] == d and r["split"] == s)
            assert np.allclose(np.column_stack(lines[f"{d}:{s}"].get_data()), pts)
    accs = [r["word_acc"] for r in rows]
    lo, hi = ax_acc.get_ylim()
    assert lo <= min(accs) and max(accs) <= hi
    assert hi - lo <= 1.5 * (max(accs) - min(accs)) + 0.03  # fitted, not a fixed 0..1


def test_dictionary_plot_points_are_the_rows_oov_rates_and_perplexities(runs):
    dec = fake_dictionary_decoding()
    fig = viz.fig_dictionary_size(runs["lines_dec"])
    for d in ("greedy", "dictionary", "unigram", "bigram"):
        pts = sorted((r["size"], r["wer"]) for r in dec["rows"] if r["decoder"] == d)
        assert np.allclose(np.column_stack(one(fig, f"{d}:test").get_data()), pts)
    oov = sorted({(r["size"], 100 * r["oov_rate"]) for r in dec["rows"]})
    assert np.allclose(np.column_stack(one(fig, "oov").get_data()), oov)
    for lm in ("unigram", "bigram"):
        pts = sorted((int(n), p[lm]) for n, p in dec["perplexity"].items())
        assert np.allclose(np.column_stack(one(fig, f"perplexity:{lm}").get_data()), pts)
    assert fig.axes[0].get_xscale() == "log"
    assert fig.axes[0].get_yscale() == "log"  # WERs above zero spanning dictionary sizes
    img = iio.imread(viz.png_bytes(fig))
    assert img[..., :3].astype(float).mean(axis=-1).std() > 10.0


def ranks(values):
    """Rank of each value among `values`, 0..N-1, by counting the smaller ones (no ties here)."""
    return [sum(v < x for v in values) for x in values]


def test_six_writers_draw_the_same_line_by_six_test_writers_from_neatest_to_sloppiest(runs):
    run = runs["lines"]
    fig = viz.fig_six_writers(run)
    everyone = [(s, i, w) for s in ("train", "validation", "test") for i, w in enumerate(ih.line_writers(s))]
    per_trait = [ranks([getattr(w, t) for _, _, w in everyone]) for t in ("inertia", "warp_rms", "tremor")]
    score = {(s, i): np.mean([r[n] for r in per_trait]) / (len(everyone) - 1) for n, (s, i, _) in enumerate(everyone)}
    test_scores = sorted((score["test", i], i) for i in range(ih.LINE_WRITERS["test"]))
    inks = by_gid(fig, "ink")
    assert len(inks) == 6
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    shown = [int(t.split()[2].rstrip(":")[2:]) for t in titles]
    assert shown[0] == test_scores[0][1] and shown[-1] == test_scores[-1][1]  # the neatest and the sloppiest
    assert [score["test", i] for i in shown] == sorted(score["test", i] for i in shown)
    for ink, i, title in zip(inks, shown, titles):
        s = ih.render_writer_line(run["six_writers_text"], "test", i, 0)
        down = s.pen_up[1:] < 0.5
        assert np.allclose([seg[1] for seg in ink.get_segments()], (s.xy - [s.xy[:, 0].min(), 0])[1:][down])
        w = ih.line_writers("test")[i]
        assert f"inertia {w.inertia:.2f}" in title and f"warp {w.warp_rms:.2f}" in title
    assert f"'{run['six_writers_text']}'" in fig._suptitle.get_text()


def test_alphabet_stroke_start_rings_sit_under_the_ink_so_the_i_dot_shows(runs):
    fig = viz.fig_alphabet(runs["words"])
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("'i'"))
    ink = ax.findobj(lambda a: a.get_gid() == "ink")[0]
    rings = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert len(rings) == 2
    assert all(r.get_markerfacecolor() == "none" and r.get_zorder() < ink.get_zorder() for r in rings)


def test_forward_only_run_is_not_called_bidirectional_or_per_direction(runs):
    run = {**runs["words"], "config": {**runs["words"]["config"], "bidirectional": False}}
    title = viz.fig_training_curves(run)._suptitle.get_text()
    assert "forward-only" in title and "per direction" not in title and "BLSTM" not in title
    fig, show, _ = gif_script.build_animation(run)
    words = " ".join(texts(fig)).lower()
    assert "bidirectional" not in words and "blstm" not in words and "both directions" not in words
    assert "depends on pen samples 1..t only" in words


@pytest.mark.parametrize("source,says,never", [("untrained", "--epochs 0", "--load-model"),
                                               ("loaded", "--load-model", "--epochs 0")])
def test_run_without_history_says_why_from_model_source(runs, source, says, never):
    run = {**runs["words"], "history": [], "model_source": source}
    words = " ".join(texts(viz.fig_training_curves(run)))
    assert "No training history" in words and says in words and never not in words


# ---------------------------------------------------------------------------
# The GIF
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("task,index", [("words", 1), ("lines", 0)])
def test_gif_animates_the_tasks_sample_loops_holds_its_last_frame_and_fits(run_files, docs, tmp_path, monkeypatch,
                                                                           capsys, task, index):
    monkeypatch.setattr(gif_script, "MAX_FRAMES", 2)  # the frame logic, not the frame count, is under test
    out = tmp_path / "reading.gif"
    assert gif_script.main([str(run_files[task]), "--out", str(out)]) == 0
    T = len(docs[task]["alignments"][index]["xy"])
    frames = iio.imread(out, index=None)  # (N, H, W, 3)
    assert len(frames) == len(gif_script.frame_steps(T)) > 1
    assert out.stat().st_size <= gif_script.MAX_BYTES
    assert not np.array_equal(frames[0], frames[-1])
    first, last = iio.immeta(out, index=0), iio.immeta(out, index=len(frames) - 1)
    assert first["loop"] == 0  # 0 = loop forever
    assert 60 <= first["duration"] <= 100
    assert last["duration"] == gif_script.HOLD_MS
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("task", TASKS)
def test_gif_says_what_is_shown_and_never_that_the_network_has_read_only_up_to_t(runs, task):
    fig, show, a = gif_script.build_animation(runs[task])
    T = len(a["xy"])
    show(T // 2)
    words = " ".join(texts(fig))
    for claim in ("read so far", "not read yet", "decoded so far"):
        assert claim not in words
    assert f"greedy decode of outputs 1-{T // 2 + 1}" in words
    assert "computed from the whole" in words  # the quick runs are bidirectional
    show(T - 1)
    assert f"greedy decode of all {T} outputs" in " ".join(texts(fig))


def test_frame_steps_cover_the_sample_and_end_on_its_last_step():
    for T in (1, 5, 79, 120, 121, 500, 1200):
        steps = gif_script.frame_steps(T)
        assert steps[0] == 0 and steps[-1] == T - 1
        assert len(steps) <= gif_script.MAX_FRAMES + 1
        assert all(b > a for a, b in zip(steps, steps[1:]))


@pytest.mark.parametrize("task", TASKS)
def test_running_decode_of_the_whole_sample_equals_run_json_decoded(runs, task):
    for a in runs[task]["alignments"]:
        assert viz.greedy_string(a["log_probs"], runs[task]["task"]["alphabet"]) == a["decoded"]


# ---------------------------------------------------------------------------
# Character confusion counting
# ---------------------------------------------------------------------------


def as_dict(matrix, labels):
    return {(labels[i], labels[j]): int(matrix[i, j]) for i, j in zip(*np.nonzero(matrix))}


def test_confusion_counts_match_hand_worked_alignments():
    # ant|an: a-a n-n t-del;  ant|aint: a-a ins-i n-n t-t;  ant|ent: a-e n-n t-t;  ant|'': three deletions
    m, labels = viz.confusion_counts([("ant", "an"), ("ant", "aint"), ("ant", "ent"), ("ant", "")], ih.ALPHABET)
    assert labels == list(ih.ALPHABET) + [E]
    assert as_dict(m, labels) == {("a", "a"): 2, ("n", "n"): 3, ("t", "t"): 2, ("t", E): 2, (E, "i"): 1,
                                  ("a", "e"): 1, ("a", E): 1, ("n", E): 1}


def test_confusion_counts_of_identical_strings_are_diagonal_spaces_included():
    m, labels = viz.confusion_counts([("moon", "moon"), ("to it", "to it")], ih.LINE_ALPHABET)
    assert as_dict(m, labels) == {("m", "m"): 1, ("o", "o"): 3, ("n", "n"): 1, ("t", "t"): 2, ("i", "i"): 1,
                                  (" ", " "): 1}


def test_confusion_counts_give_characters_outside_the_alphabet_their_own_label():
    m, labels = viz.confusion_counts([("ab", "ax")], ih.ALPHABET)
    assert labels == list(ih.ALPHABET) + ["b", "x", E]
    assert as_dict(m, labels) == {("a", "a"): 1, ("b", "x"): 1}


# ---------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback, nothing written
# ---------------------------------------------------------------------------


def edited(doc, edit):
    doc = json.loads(json.dumps(doc))
    edit(doc)
    return doc


def set_key(keys, value):
    def edit(doc):
        d = doc
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


MALFORMED = {  # name -> (task, edit, words the error line must hold)
    "nan_in_history": ("lines", set_key(["history", 0, "validation", "cer"], float("nan")),
                       "history[0].validation.cer is nan"),
    "negative_final_wer": ("words", set_key(["final", "held_out", "wer"], -0.5), "final.held_out.wer is -0.5"),
    "argmax_outside_classes": ("lines", lambda d: d["alignments"][1]["argmax_path"].__setitem__(3, 28),
                               "alignments[1].argmax_path holds 28"),
    "char_of_outside_text": ("words", lambda d: d["alignments"][0]["char_of"].__setitem__(0, 99),
                             "alignments[0].char_of holds 99"),
    "log_probs_wrong_width": ("words", lambda d: [row.pop() for row in d["alignments"][0]["log_probs"]],
                              "alignments[0].log_probs has shape"),
    "ragged_xy": ("lines", lambda d: d["alignments"][0]["xy"][5].pop(), "alignments[0].xy is not a numeric array"),
    "negative_jitter": ("words", set_key(["config", "jitter"], -0.1), "config.jitter is -0.1"),
    "negative_seed": ("words", set_key(["config", "seed"], -3), "config.seed is -3"),
    "train_word_outside_alphabet": ("words", lambda d: d["split"]["train_words"].__setitem__(2, "dog"),
                                    "split.train_words[2] is 'dog'"),
    "one_alignment": ("words", lambda d: d["alignments"].pop(), "alignments holds 1 items"),
    "unknown_task": ("words", set_key(["task", "name"], "sentences"), "task.name is 'sentences'"),
    "per_writer_missing": ("lines", lambda d: d.pop("per_writer"), "per_writer is missing"),
    "decoding_row_nan": ("lines_dec", lambda d: d["decoding"]["rows"][2].__setitem__("wer", float("inf")),
                         "decoding.rows[2].wer is inf"),
    "wrong_decoding_kind": ("words", set_key(["decoding", "kind"], "dictionary"), "decoding.kind is 'dictionary'"),
    "trained_without_history": ("words", set_key(["history"], []), "history is empty"),
}


@pytest.fixture(scope="module")
def bad_inputs(run_files, docs, tmp_path_factory):
    """{case: (run.json path, output path, words the error must hold)}."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "corrupt.json").write_text('{"schema_version": 2, "config": ')
    (tmp / "no_keys.json").write_text(json.dumps({"schema_version": 2, "config": docs["words"]["config"]}))
    (tmp / "v1.json").write_text(json.dumps({**docs["words"], "schema_version": 1}))
    (tmp / "a_file").write_text("not a folder")
    cases = {
        "missing": (tmp / "nope.json", tmp / "out", "--save-json run.json"),
        "corrupt_json": (tmp / "corrupt.json", tmp / "out", "not valid JSON"),
        "missing_keys": (tmp / "no_keys.json", tmp / "out", "missing required keys: task, model_source"),
        "wrong_schema_version": (tmp / "v1.json", tmp / "out", "schema_version 1, this script reads 2"),
        "output_under_a_regular_file": (run_files["words"], tmp / "a_file" / "sub", "a_file"),
    }
    for name, (task, edit, words) in MALFORMED.items():
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(edited(docs[task], edit)))  # NaN and Infinity as json.dumps writes them
        cases[name] = (path, tmp / "out", words)
    return cases


CASES = ["missing", "corrupt_json", "missing_keys", "wrong_schema_version", "output_under_a_regular_file",
         *MALFORMED]


@pytest.mark.parametrize("script", (viz, gif_script))
@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_stderr_line_naming_file_and_key(script, case, bad_inputs, capsys):
    path, out, words = bad_inputs[case]
    if script is gif_script:
        out = out / "x.gif"
    assert script.main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert words in err
    if case in MALFORMED:
        assert repr(str(path)) in err  # names the file too
    assert not out.exists()


def test_a_malformed_run_json_leaves_every_old_figure_as_it_was(run_files, docs, tmp_path, capsys):
    out = tmp_path / "viz"
    out.mkdir()
    old = {name: f"old {name}".encode() for name in EXPECTED_PNGS["words"]}
    for name, data in old.items():
        (out / name).write_bytes(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(edited(docs["words"], lambda d: d["alignments"][1]["argmax_path"].__setitem__(0, -1))))
    assert viz.main([str(bad), "--out", str(out)]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


@pytest.mark.parametrize("blocker", ["folder", "read-only file"])
def test_an_unwritable_figure_path_fails_before_any_figure_is_written(run_files, tmp_path, capsys, blocker):
    out = tmp_path / "viz"
    out.mkdir()
    if blocker == "folder":
        (out / "training_curves.png").mkdir()
    else:
        (out / "training_curves.png").write_bytes(b"old")
        (out / "training_curves.png").chmod(0o444)
    assert viz.main([str(run_files["lines"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training_curves.png" in err
    assert os.listdir(out) == ["training_curves.png"]


@pytest.mark.parametrize("script,out,what", [(viz, "viz", "figure"), (gif_script, "run.gif", "GIF")])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_no_file(run_files, tmp_path, capsys, monkeypatch,
                                                                      script, out, what):
    def disk_full(path, data, what, durable=True):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ih, "write_output", disk_full)
    assert script.main([str(run_files["words"]), "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: cannot write {what} " in err and "No space left on device" in err, err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_each_script_process_given_a_nan_reports_one_line_and_no_traceback(bad_inputs, tmp_path):
    path = bad_inputs["nan_in_history"][0]
    scripts = ("visualize_iam_handwriting.py", "make_iam_handwriting_gif.py")
    done = run_chains([[script_cmd(s, path, "--out", tmp_path / "out.gif")] for s in scripts])
    for script, (r,) in zip(scripts, done):
        assert r.returncode == 2, script
        assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr and "history[0].validation.cer is nan" in r.stderr
    assert not (tmp_path / "out.gif").exists()
