"""Reading ink from outside the database: InkML, lineStrokes XML and JSON strokes, pages, --read
and the pen pad's HTTP API (--serve).

No test uses the real IAM-OnDB or a shipped model. A tiny iam-ondb model is trained here, in
seconds, on three synthetic cursive lines exported in the IAM-OnDB format, until it reads them;
the same lines then go in through every route, and the readings must agree.
"""
import dataclasses
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
from conftest import with_ctrl_c

import iam_handwriting as ih

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ("a kite can hit", "the ink", "hat")  # train, validation, test: the training line spells every character
CHROMIUM = "/usr/bin/chromium"


def quiet(*args, **kwargs):
    pass


def run_cli(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "iam_handwriting.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, timeout=timeout, input=stdin)


# ---------------------------------------------------------------------------
# Fixtures: three exported lines and a tiny model that reads them
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_db(tmp_path_factory):
    """Three synthetic lines by three writers, one per split, in the IAM-OnDB layout."""
    folder = tmp_path_factory.mktemp("db")
    splits = ("train", "validation", "test")
    samples = {split: [ih.render_writer_line(text, split, 0, 100 + i)]
               for i, (split, text) in enumerate(zip(splits, TEXTS))}
    ih.export_iam_ondb(folder, samples, log=quiet)
    lines, _ = ih.load_iam_ondb(folder, log=quiet)
    return folder, [lines[split][0] for split in splits]


def line_file(folder, line):
    return os.path.join(folder, "lineStrokes", ih._form_folder(line.form_id), f"{line.line_id}.xml")


@pytest.fixture(scope="module")
def tiny_model(fixture_db, tmp_path_factory):
    """(model path, cfg, data): a hidden-12 BLSTM trained on the three lines until it reads them."""
    folder, _ = fixture_db
    cfg = ih.RunConfig(task="iam-ondb", data_dir=str(folder), features="graves25", hidden=12, lr=0.03,
                       dtype="float64", seed=0)
    data = ih.iam_ondb_data(cfg, ih.make_streams(0), ih.serial_map, quiet)
    cfg = dataclasses.replace(cfg, alphabet=data.alphabet)
    samples = data.training_samples(None, ih.serial_map) + [s for v in data.eval_sets.values() for s in v]
    rng = np.random.default_rng(0)
    params = ih.init_params(rng, cfg.hidden, 1, True, 25, ih.n_classes(cfg))
    adam, timer, decode = ih.adam_init(params), ih.Timer(), ih.make_decoder("greedy", cfg, cfg.alphabet)
    for step in range(600):
        ih.train_step(params, adam, samples, cfg.lr, cfg, data, timer)
        if step % 25 == 24 and decode(ih.run_model(params, samples, data)) == [s.text for s in samples]:
            break
    assert decode(ih.run_model(params, samples, data)) == [s.text for s in samples], "the tiny model did not learn"
    path = tmp_path_factory.mktemp("model") / "tiny.npz"
    path.write_bytes(ih.model_bytes(params, cfg, ih.input_normalisation(data)))
    return str(path), cfg, data


@pytest.fixture(scope="module")
def reader(tiny_model):
    params, cfg, normalisation = ih.load_reading_model(tiny_model[0])
    return ih.Reader(params, cfg, normalisation)


def json_strokes(line, with_times=True):
    return json.dumps([np.column_stack([line.points[line.stroke == k]] +
                                       ([line.times[line.stroke == k]] if with_times else [])).tolist()
                       for k in range(line.stroke.max() + 1)]).encode()


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------

INKML = """<?xml version="1.0" encoding="UTF-8"?>
<inkml:ink xmlns:inkml="http://www.w3.org/2003/InkML">
  <inkml:definitions>
    <inkml:context xml:id="yx">
      <inkml:traceFormat>
        <inkml:channel name="Y" type="decimal"/>
        <inkml:channel name="X" type="decimal"/>
        <inkml:channel name="T" type="decimal" units="ms"/>
        <inkml:channel name="F" type="integer"/>
      </inkml:traceFormat>
    </inkml:context>
  </inkml:definitions>
  <inkml:traceGroup contextRef="#yx">
    <inkml:trace>0 10 1000 5, 1 11 1020 5, 3 13 1040 6</inkml:trace>
    <inkml:trace type="penUp">50 50 1050 0, 60 60 1060 0</inkml:trace>
  </inkml:traceGroup>
  <inkml:trace contextRef="#yx">5 20 2000 1, '1 '1 '20 '0, "1 "0 "0 "0, 2 3 4 0</inkml:trace>
  <inkml:trace contextRef="#yx">#A #1F 3000 T, *  '1 '20 F</inkml:trace>
</inkml:ink>
"""


def test_inkml_channel_order_differences_hex_groups_and_pen_up_traces():
    ink = ih.parse_ink(INKML.encode(), "t.inkml")
    assert ink.format == "inkml"
    # trace 1 in a traceGroup (Y X T F, T in ms); the penUp trace is hover, not ink
    # trace 2: explicit, then first differences, then second differences (sticky per channel)
    #   y: 5, 6, 6+1+1=8, then "2" keeps the second-difference order: vel 2+2=4 -> 12
    #   x: 20, 21, 21+1+0=22, then 22+1+3=26;  t: 2000, 2020, 2040, 2060+4=2064 ms
    # trace 3: hexadecimal #A = 10, #1F = 31; "*" repeats the previous y, x grows by 1; F (ignored) is T/F
    np.testing.assert_array_equal(ink.stroke, [0, 0, 0, 1, 1, 1, 1, 2, 2])
    np.testing.assert_allclose(ink.points, [[10, 0], [11, 1], [13, 3], [20, 5], [21, 6], [22, 8], [26, 12],
                                            [31, 10], [32, 10]])
    np.testing.assert_allclose(ink.times, [1.0, 1.02, 1.04, 2.0, 2.02, 2.04, 2.064, 3.0, 3.02])


def test_inkml_without_trace_format_is_x_y_and_without_times():
    data = b'<ink xmlns="http://www.w3.org/2003/InkML"><trace>1 2, 3 4,</trace><trace>5 6</trace></ink>'
    ink = ih.parse_ink(data, "plain")
    np.testing.assert_array_equal(ink.points, [[1, 2], [3, 4], [5, 6]])
    assert ink.times is None and ink.stroke.tolist() == [0, 0, 1]


def test_inkml_writer_reads_back_exactly(fixture_db):
    line = fixture_db[1][0]
    ink = ih.parse_ink(ih.inkml_bytes(line.points, line.stroke, line.times), "x.inkml")
    np.testing.assert_array_equal(ink.points, line.points)
    np.testing.assert_array_equal(ink.times, line.times)
    np.testing.assert_array_equal(ink.stroke, line.stroke)


def test_json_strokes_with_y_up_and_the_object_form():
    up = ih.parse_ink(b"[[[0, 0], [1, 2]], [], [[3, 4]]]", "s.json", y_up=True)
    np.testing.assert_array_equal(up.points, [[0, 0], [1, -2], [3, -4]])  # y down inside
    assert up.times is None and up.stroke.tolist() == [0, 0, 1] and up.y_sign == -1.0
    obj = ih.parse_ink(b'{"strokes": [[[0, 0, 0.0], [1, 2, 0.02]]], "y_up": false}', "o.json")
    np.testing.assert_array_equal(obj.times, [0.0, 0.02])


HOSTILE = {
    "no ink": (b"[]", "no ink"),
    "empty strokes": (b"[[], []]", "no ink"),
    "NaN in JSON": (b"[[[0, NaN], [1, 1]]]", "NaN is not a number"),
    "NaN in InkML": (b"<ink><trace>0 nan, 1 1</trace></ink>", "not a finite number"),
    "huge coordinate": (b"[[[0, 1e300], [1, 1]]]", "beyond"),
    "mixed times": (b"[[[0, 0, 0], [1, 1]]]", "is not a list of"),
    "bad point": (b'[[[0, "a"]]]', "is not a list of"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    "not JSON or XML": (b"hello", "neither InkML"),
    "other XML": (b"<svg/>", "neither InkML <ink> nor"),
    "entities": (b'<?xml version="1.0"?><!DOCTYPE ink [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
                 b"<ink><trace>&b;</trace></ink>", "refused DTD entity"),
    "external entity": (b'<!DOCTYPE ink SYSTEM "file:///etc/passwd"><ink/>', "refused external DTD"),
    "InkML difference first": (b"<ink><trace>'1 '1, 2 2</trace></ink>", "starts with a difference"),
    "InkML junk": (b"<ink><trace>1 2, 3 x</trace></ink>", "unexpected 'x'"),
    "too many points": (b"[" + b",".join([b"[[0,0],[1,1]]"] * 60_000) + b"]", "at most 100000"),
    "huge file": (b"[" + b" " * ih.MAX_INK_BYTES + b"]", "more than 4 MB"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_inputs_give_one_line_naming_the_input(name):
    data, message = HOSTILE[name]
    t0 = time.perf_counter()
    with pytest.raises(ih.UserError) as err:
        ih.parse_ink(data, "evil")
    text = str(err.value)
    assert message in text and text.startswith("evil") and "\n" not in text, text
    assert time.perf_counter() - t0 < 30.0  # no hang (under 1 s on an idle machine)


def test_a_million_points_and_a_line_too_long_to_resample_are_refused_quickly(reader):
    million = ih.Ink("m", "json", np.zeros((1_000_000, 2)), np.zeros(1_000_000, np.int64), None)
    with pytest.raises(ih.UserError, match="at most 20000"):  # one text line of a million samples
        ih.read_ink(reader, million)
    # A zigzag one unit high and a million wide would resample to ~1e7 steps of 0.15 corpus heights.
    zigzag = np.column_stack([np.linspace(0, 1e6, 400), np.arange(400) % 2])
    stretched = ih.checked_ink("s", "json", [zigzag])
    t0 = time.perf_counter()
    with pytest.raises(ih.UserError, match="would resample to"):
        ih.read_ink(reader, stretched)
    assert time.perf_counter() - t0 < 30.0


def test_too_many_lines_and_too_much_ink_in_all_are_refused(fixture_db, reader):
    bars = [np.array([[1000.0 - 3 * k, 10.0 * k], [1000.0 - 3 * k, 10.0 * k + 5]]) for k in range(300)]  # a staircase
    with pytest.raises(ih.UserError, match="more than 200 text lines"):
        ih.read_ink(reader, ih.checked_ink("stairs", "json", bars))
    line = fixture_db[1][0]
    strokes, _ = page_of([line] * 150, order=range(150))  # 150 lines of ~370 steps
    t0 = time.perf_counter()
    with pytest.raises(ih.UserError, match="more than 50000 network steps"):
        ih.read_ink(reader, ih.checked_ink("long page", "json", strokes))
    assert time.perf_counter() - t0 < 30.0


def test_hostile_files_through_the_command_line_exit_2_with_one_line(tiny_model, tmp_path):
    model = tiny_model[0]
    for name in ("NaN in JSON", "entities", "too many points"):
        path = tmp_path / "ink"
        path.write_bytes(HOSTILE[name][0])
        r = run_cli("--read", path, "--load-model", model)
        err = r.stderr.decode().strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and HOSTILE[name][1] in err[0], (name, r.stderr)
    r = run_cli("--read", tmp_path / "missing.inkml", "--load-model", model)
    assert r.returncode == 2 and b"no such file" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_cli("--read", tmp_path, "--load-model", model)
    assert r.returncode == 2 and b"a folder" in r.stderr


# ---------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------


def page_of(lines, order=(0, 1, 2), pitch=3.0):
    """Lines stacked `pitch` line heights apart (y down), written in `order`: (strokes, truth)."""
    strokes, truth = [], []
    height = max(np.ptp(l.points[:, 1]) for l in lines)
    for k in order:
        line = lines[k]
        p = line.points - line.points.min(axis=0) + [0.0, k * pitch * height]
        for s in range(line.stroke.max() + 1):
            strokes.append(p[line.stroke == s])
            truth.append(k)
    return strokes, np.array(truth)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_a_page_of_three_lines_is_grouped_into_its_lines_top_to_bottom(fixture_db, order):
    strokes, truth = page_of(fixture_db[1], order)
    ink = ih.checked_ink("page", "json", strokes)
    groups = ih.group_lines(ink.points, ink.stroke)
    assert [truth[g].tolist() for g in groups] == [[k] * int((truth == k).sum()) for k in (0, 1, 2)]
    for g in groups:
        assert np.all(np.diff(g) > 0)  # each line keeps its writing order


def test_one_line_is_one_group(fixture_db):
    for line in fixture_db[1]:
        assert len(ih.group_lines(line.points, line.stroke)) == 1


def test_a_page_reads_its_lines_top_to_bottom(fixture_db, reader):
    lines = fixture_db[1]
    strokes, truth = page_of(lines, (1, 2, 0))
    times = []
    for k in (1, 2, 0):
        times += [lines[k].times[lines[k].stroke == s] for s in range(lines[k].stroke.max() + 1)]
    result = ih.read_ink(reader, ih.checked_ink("page", "json", strokes, times))
    assert [l["text"] for l in result["lines"]] == list(TEXTS)


# ---------------------------------------------------------------------------
# The same ink, the same reading
# ---------------------------------------------------------------------------


def test_the_same_ink_reads_the_same_through_every_format_and_the_evaluation_path(fixture_db, tiny_model, reader,
                                                                                  tmp_path):
    folder, lines = fixture_db
    _, cfg, data = tiny_model
    samples = data.training_samples(None, ih.serial_map) + [s for v in data.eval_sets.values() for s in v]
    evaluated = ih.run_model(reader.params, samples, data)  # the --task iam-ondb evaluation path
    by_text = dict(zip([s.text for s in samples], evaluated))
    for line in lines:
        routes = {"linestrokes": open(line_file(folder, line), "rb").read(),
                  "inkml": ih.inkml_bytes(line.points, line.stroke, line.times),
                  "json": json_strokes(line)}
        for fmt, data_bytes in routes.items():
            ink = ih.parse_ink(data_bytes, fmt)
            assert ink.format == fmt
            traj, _ = ih.line_input(ink, np.arange(ink.stroke[-1] + 1), reader.mean_speed(), cfg.features)
            np.testing.assert_allclose(ih.line_log_probs(reader, traj), by_text[line.text], atol=1e-9)
            result = ih.read_ink(reader, ink)
            assert [l["text"] for l in result["lines"]] == [line.text], fmt
        for fmt, data_bytes in routes.items():  # and through the command line
            path = tmp_path / f"line.{fmt}"
            path.write_bytes(data_bytes)
            r = run_cli("--read", path, "--load-model", tiny_model[0])
            assert r.returncode == 0 and r.stdout.decode() == line.text + "\n", (fmt, r.stderr)


def test_stdin_and_several_files(fixture_db, tiny_model, tmp_path):
    folder, lines = fixture_db
    r = run_cli("--read", "-", "--load-model", tiny_model[0], stdin=json_strokes(lines[0]))
    assert r.returncode == 0 and r.stdout.decode() == TEXTS[0] + "\n", r.stderr
    paths = [line_file(folder, line) for line in lines]
    r = run_cli("--read", *paths, "--load-model", tiny_model[0])
    assert r.stdout.decode().splitlines() == [f"{p}: {t}" for p, t in zip(paths, TEXTS)], r.stderr


def test_scale_translation_and_sampling_rate_do_not_change_the_reading(fixture_db, reader):
    line = fixture_db[1][2]
    base = ih.read_ink(reader, ih.checked_ink("a", "json", [line.points[line.stroke == k] for k in
                                                            range(line.stroke.max() + 1)],
                                              [line.times[line.stroke == k] for k in range(line.stroke.max() + 1)]))
    moved = line.points * 0.037 + [1e4, -3e3]  # another device's units and origin
    other = ih.read_ink(reader, ih.checked_ink("b", "json", [moved[line.stroke == k] for k in
                                                             range(line.stroke.max() + 1)],
                                               [line.times[line.stroke == k] for k in range(line.stroke.max() + 1)]))
    assert [l["text"] for l in other["lines"]] == [l["text"] for l in base["lines"]] == [TEXTS[2]]


def test_ink_without_times_gets_the_training_mean_speed_and_otherwise_the_same_features(fixture_db, reader):
    line = fixture_db[1][0]
    with_t = ih.parse_ink(json_strokes(line), "t")
    without = ih.parse_ink(json_strokes(line, with_times=False), "n")
    everything = np.arange(line.stroke.max() + 1)
    a, _ = ih.line_input(with_t, everything, reader.mean_speed(), "graves25")
    b, _ = ih.line_input(without, everything, reader.mean_speed(), "graves25")
    speed = ih.GRAVES25_NAMES.index("speed")
    others = [i for i in range(25) if i != speed]
    np.testing.assert_array_equal(a[:, others], b[:, others])
    # constant pen speed: the training mean times the chord-over-path ratio
    ratio = b[:, speed] / reader.mean_speed()
    assert 0.8 < np.median(ratio) < 1.2 and ratio.max() < 1.5, (np.median(ratio), ratio.max())  # low at corners


# ---------------------------------------------------------------------------
# Character spans from the CTC alignment
# ---------------------------------------------------------------------------


def test_character_spans_are_greedy_decodings_runs_and_partition_the_steps():
    rng = np.random.default_rng(3)
    for _ in range(50):
        T, K = int(rng.integers(1, 40)), int(rng.integers(2, 6))
        lp = np.log(rng.dirichlet(np.full(K, 0.3), size=T))  # (T, K)
        lp[rng.random(T) < 0.5, 0] = 0.0  # many blanks, as a trained network
        labels, spike, span = ih.character_spans(lp)
        assert labels.tolist() == ih.greedy_decode(lp[:, None, :], [T])[0]
        if len(labels):
            assert span[0, 0] == 0 and span[-1, 1] == T - 1 and np.all(span[1:, 0] == span[:-1, 1] + 1)
            assert np.all(span[:, 0] <= spike[:, 0]) and np.all(spike[:, 1] <= span[:, 1])
            assert all(np.all(np.argmax(lp[a:b + 1], axis=1) == c) for c, (a, b) in zip(labels, spike))


def test_each_preprocessed_point_knows_the_input_point_it_lies_at(fixture_db):
    for line in fixture_db[1]:
        pre = ih.preprocess(line.points, line.stroke, line.times)
        src = pre.source  # (T,) fractional index into line.points
        starts = ih.stroke_starts(pre.stroke)
        assert np.all(src[starts] == np.round(src[starts]))  # a stroke starts on an input point
        for k in range(pre.stroke.max() + 1):
            mine = src[pre.stroke == k]
            assert np.all(np.diff(mine) >= 0)  # in writing order
            assert len(set(line.stroke[np.floor(mine).astype(int)])) == 1  # within one input stroke
        # Flip, rotation, shear, scaling and the baseline (a straight line) make the normalisation
        # affine, and an affine map keeps ratios along a segment: so the preprocessed points are
        # one affine map of the input ink interpolated at `source`.
        lo, frac = np.floor(src).astype(int), src - np.floor(src)
        hi = np.minimum(lo + 1, len(line.points) - 1)
        at = line.points[lo] + frac[:, None] * (line.points[hi] - line.points[lo])  # (T, 2)
        design = np.column_stack([at, np.ones(len(at))])  # (T, 3)
        fit, *_ = np.linalg.lstsq(design, pre.points, rcond=None)
        np.testing.assert_allclose(design @ fit, pre.points, atol=1e-6)


def test_json_output_has_both_readings_times_and_ink_spans(fixture_db, tiny_model, tmp_path):
    folder, lines = fixture_db
    line = lines[1]
    r = run_cli("--read", line_file(folder, line), "--load-model", tiny_model[0], "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (out,) = doc["lines"]
    assert out["text"] == out["greedy"] == line.text and "lm" in out and out["seconds"] > 0
    assert "".join(c["char"] for c in out["chars"]) == line.text
    points = [c["points"] for c in out["chars"]]
    assert points[0][0] == 0 and all(a[1] <= b[0] + 1 for a, b in zip(points, points[1:]))  # in writing order
    frames = [c["frames"] for c in out["chars"]]
    assert frames[0][0] == 0 and frames[-1][1] == out["frames"] - 1
    for c in out["chars"]:
        x0, y0, x1, y1 = c["box"]
        assert x0 <= c["at"][0] <= x1 and y0 <= c["at"][1] <= y1 and 0 < c["p"] <= 1


# ---------------------------------------------------------------------------
# Models that cannot read ink
# ---------------------------------------------------------------------------


def test_models_that_cannot_read_ink_are_refused_in_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    path = tiny_model[0]
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    no_input = tmp_path / "no_input.npz"
    np.savez(no_input, **{k: v for k, v in arrays.items() if k != "__input__"})
    words = tmp_path / "words.npz"
    cfg = ih.RunConfig(hidden=4)
    words.write_bytes(ih.model_bytes(ih.init_params(np.random.default_rng(0), 4), cfg, {"shift": [0, 0, 0],
                                     "scale": [1, 1, 1], "squash": 0.0}))
    bad_input = tmp_path / "bad_input.npz"
    np.savez(bad_input, **{**arrays, "__input__": np.array(json.dumps({"shift": [0], "scale": [1], "squash": 0}))})
    cases = [(no_input, "has no input normalisation"), (words, "holds a words model"),
             (bad_input, "does not fit its 25 input features")]
    for model, message in cases:
        assert ih.main(["--read", "x.json", "--load-model", str(model)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    monkeypatch.setattr(ih, "DEFAULT_MODEL", str(tmp_path / "models" / "iam_ondb.npz"))
    assert ih.main(["--read", "x.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model to read with" in err[0] and "--load-model" in err[0]
    # the evaluation path refuses a model whose features are not the ones asked for
    assert ih.main(["--task", "iam-ondb", "--load-model", path, "--features", "raw", "--data-dir", "x"]) == 2
    assert "--features raw contradicts the model file, which reads graves25" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--read", "a", "--serve"], "cannot be combined"),
    (["--json"], "--json goes with --read"),
    (["--read", "a", "--epochs", "3"], "--epochs cannot be combined with --read"),
    (["--read", "a", "--decoder", "lexicon"], "cannot read ink"),
])
def test_flags_that_do_not_go_with_reading_are_refused(args, message, capsys):
    assert ih.main(args) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The pen pad's HTTP API
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pad(reader):
    """A pad server on a free port of 127.0.0.1, in a thread: yields its port."""
    with open(ih.PAD_PAGE, "rb") as f:
        server = ih.PadServer(0, reader, f.read(), quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def test_the_page_is_served_without_cors_headers(pad):
    response, body = request(pad, "GET", "/")
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert b"<canvas" in body and b"pointerdown" in body
    assert not [h for h, _ in response.getheaders() if h.lower().startswith("access-control")]
    assert request(pad, "GET", "/etc/passwd")[0].status == 404


def test_post_read_gives_the_text_of_an_exported_line(pad, fixture_db):
    for line in fixture_db[1]:
        response, body = request(pad, "POST", "/read", json_strokes(line))
        assert response.status == 200, body
        doc = json.loads(body)
        assert [l["greedy"] for l in doc["lines"]] == [line.text]
        assert not [h for h, _ in response.getheaders() if h.lower().startswith("access-control")]
    _, body = request(pad, "POST", "/read", json.dumps({"strokes": json.loads(json_strokes(fixture_db[1][0])),
                                                        "lm": False}))
    assert json.loads(body)["lines"][0].keys() >= {"text", "greedy", "chars", "seconds"}


@pytest.mark.parametrize("body, headers, status, message", [
    (b"[[[0, 0]", {}, 400, "invalid JSON"),
    (b"[[[0, NaN]]]", {}, 400, "NaN"),
    (b"[]", {}, 400, "no ink"),
    (b'{"strokes": [[[0, 0]]], "lm": 3}', {}, 400, "lm"),
    (b"[]", {"Content-Type": "text/plain"}, 415, "application/json"),
    (b"[]", {"Host": "evil.example:80"}, 403, "Host"),
    (b" " * (ih.MAX_BODY_BYTES + 1), {}, 413, "at most"),
])
def test_bad_requests_get_one_line_errors(pad, body, headers, status, message):
    response, data = request(pad, "POST", "/read", body, headers)
    assert response.status == status
    error = json.loads(data)["error"]
    assert message in error and "\n" not in error


def test_an_oversized_body_is_refused_unread(pad):
    conn = http.client.HTTPConnection("127.0.0.1", pad, timeout=10)
    conn.putrequest("POST", "/read")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10 * 2**30))  # 10 GB announced, nothing sent
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    conn.close()


def test_serve_stops_cleanly_on_ctrl_c(tiny_model, fixture_db):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "iam_handwriting.py"), "--serve", "0",
                             "--load-model", tiny_model[0]], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=with_ctrl_c)
    try:
        seen = [proc.stdout.readline()]  # "no LM reading: ..." first: the tiny alphabet cannot spell English
        while seen[-1] and "pen pad at" not in seen[-1]:
            seen.append(proc.stdout.readline())
        assert "pen pad at http://127.0.0.1:" in seen[-1], seen
        port = int(seen[-1].split("127.0.0.1:")[1].split("/")[0])
        response, body = request(port, "POST", "/read", json_strokes(fixture_db[1][2]))
        assert json.loads(body)["lines"][0]["greedy"] == TEXTS[2]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "pen pad stopped" in out and "Traceback" not in err, err


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium")
def test_the_page_reads_a_line_drawn_with_pointer_events_in_headless_chromium(pad, fixture_db, tmp_path):
    """The page replays ink as pointer events on its canvas (#draw=...), through the same handlers as a
    hand, shows the readings and keeps them in <pre id=result>. PAD_SCREENSHOT=path keeps the screenshot."""
    line = fixture_db[1][1]
    p = line.points - line.points.min(axis=0)
    p = 20 + p * (600 / np.ptp(p[:, 0]))  # CSS pixels on the canvas, y down
    drawn = [np.column_stack([p[line.stroke == k], 1000 * line.times[line.stroke == k]]).round(2).tolist()
             for k in range(line.stroke.max() + 1)]
    url = f"http://127.0.0.1:{pad}/#draw=" + urllib.parse.quote(json.dumps(drawn, separators=(",", ":")))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--window-size=1000,640",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    result = dom.split('<pre id="result"', 1)[1].split(">", 1)[1].split("</pre>", 1)[0]
    readings = json.loads(result.replace("&quot;", '"').replace("&amp;", "&"))
    assert readings["lm"] is True and readings["lines"][0]["greedy"] == line.text
    shot = os.environ.get("PAD_SCREENSHOT") or str(tmp_path / "pad.png")
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
