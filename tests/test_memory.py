"""Memory at the real database's scale: evaluation goes chunk by chunk, and the
up-front estimate (check_memory) predicts the measured peak."""
import dataclasses
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np

import iam_handwriting as ih

ROOT = Path(__file__).resolve().parents[1]


def long_lines(n, T=2000, seed=0):
    rng = np.random.default_rng(seed)
    return [ih.Sample("ab " * 10, rng.normal(size=(T, 3)).astype(np.float32), [1, 2, 3] * 10,
                      np.zeros((T, 2), np.float32), np.zeros(T, np.float32), None) for _ in range(n)]


def evaluation_peak(samples, params, data):
    tracemalloc.start()
    try:
        ih.evaluate(params, samples, data, ih.make_decoder("greedy", ih.RunConfig(), "abc"))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_evaluation_of_many_long_lines_is_chunked(monkeypatch):
    """Eight times the lines, the same peak: only EVAL_THREADS chunks of outputs live at once
    (a whole split in one array, as before, grew with the number of lines). 64 lines of 2,000
    steps are already four chunks of EVAL_FRAMES, so both sizes run chunk after chunk."""
    params = {k: v.astype(np.float32) for k, v in ih.init_params(np.random.default_rng(0), 4, 1, True, 3, 4).items()}
    data = ih.TaskData("abc", {}, None, 0, np.zeros(3), np.ones(3), 0.0, [], {})
    monkeypatch.setattr(ih, "EVAL_THREADS", 1)  # with two threads the peak depends on how their chunks overlap
    few, many = (evaluation_peak(long_lines(n), params, data) for n in (64, 512))
    assert many < 1.1 * few, (few, many)


def test_an_evaluation_holds_one_layer_at_a_time(monkeypatch):
    """A three-layer network evaluates in about the memory of a one-layer one (forward with
    cache=False frees each layer's activations before the next layer runs; with the training
    cache the LSTM part would triple), and forward_chunk_bytes predicts both within 1.5x."""
    monkeypatch.setattr(ih, "EVAL_THREADS", 1)
    samples = long_lines(16, T=1000)
    data = ih.TaskData("abc", {}, None, 0, np.zeros(3), np.ones(3), 0.0, [], {})
    peaks = {}
    for layers in (1, 3):
        params = {k: v.astype(np.float32) for k, v in
                  ih.init_params(np.random.default_rng(0), 32, layers, True, 3, 4).items()}
        tracemalloc.start()
        try:
            for _ in ih.model_outputs(params, samples, data):
                pass
            peaks[layers] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        cfg = dataclasses.replace(ih.RunConfig(), hidden=32, layers=layers, dtype="float32")
        predicted = ih.forward_chunk_bytes(cfg, 16 * 1000, 3, 4)
        assert 1 / 1.5 <= peaks[layers] / predicted <= 1.5, (layers, peaks[layers], predicted)
    assert peaks[3] < 1.6 * peaks[1], peaks


def test_the_estimate_fits_a_measured_quick_run(tmp_path):
    """run.json's memory block: the measured peak of a quick lines run, its worker's added, lies
    within a factor of 1.5 of what check_memory predicted before training."""
    out = tmp_path / "run.json"
    r = subprocess.run([sys.executable, str(ROOT / "iam_handwriting.py"), "--task", "lines", "--quick", "--epochs", "1",
                        "--quiet", "--save-json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    memory = json.loads(out.read_text())["memory"]
    assert memory["worker_peak_rss_bytes"] > 0  # the lines task trains with two processes
    ratio = (memory["peak_rss_bytes"] + memory["worker_peak_rss_bytes"]) / memory["predicted_bytes"]
    assert 1 / 1.5 <= ratio <= 1.5, memory


def test_the_estimate_counts_every_training_process():
    """Each worker holds the interpreter and its share of the largest step through training; a run
    that does not train keeps its workers for featurising and decoding, with the interpreter alone."""
    cfg = ih.check_config(dataclasses.replace(ih.RunConfig(), task="lines", hidden=64, batch_size=16))
    data = ih.TaskData("abc", {"validation": long_lines(4)}, None, 100, np.zeros(3), np.ones(3), 0.0, [], {})
    one, four = (ih.memory_estimate(dataclasses.replace(cfg, workers=w), data, training=True) for w in (1, 4))
    assert one["workers"] == 0 and four["workers"] > 3 * ih.BASE_BYTES
    assert four["total"] == four["held"] + four["fresh"] + four["work"] + four["workers"]
    assert ih.memory_estimate(dataclasses.replace(cfg, workers=4), data, training=False)["workers"] == 3 * ih.BASE_BYTES


def test_the_estimate_counts_the_training_data():
    """--lines-per-epoch 10^6 holds about 30 GiB of lines: refused before training, as data."""
    cfg = ih.check_config(dataclasses.replace(ih.RunConfig(), task="lines", hidden=32, lines_per_epoch=1_000_000))
    line = long_lines(1, T=600)[0]
    data = ih.TaskData("abc", {"validation": [line]}, None, cfg.lines_per_epoch, np.zeros(3), np.ones(3), 0.0, [], {})
    need = ih.memory_estimate(cfg, data, training=True)
    assert need["fresh"] > 10 * 2**30 > need["work"]
