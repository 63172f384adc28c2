"""A short fixed-seed training run must actually learn."""
import dataclasses

from iam_handwriting import TASKS, RunConfig, train


def test_quick_run_learns_to_read_unseen_renderings():
    cfg = dataclasses.replace(RunConfig(seed=0), **TASKS["words"].quick)
    result = train(cfg, verbose=False)  # the contents of run.json
    assert result["schema_version"] == 2
    first, last = result["history"][0], result["history"][-1]
    assert first["in_vocab"]["cer"] > 0.5  # the untrained start is far from reading
    assert last["train_loss"] < first["train_loss"] / 5
    # measured 0.017 (seed 0, 6 epochs, H = 32); the bound leaves room for BLAS differences
    assert result["final"]["in_vocab"]["cer"] < 0.05
    assert result["final"]["in_vocab"]["word_acc"] > 0.85
    assert result["final"]["held_out"]["cer"] < 0.2  # letters, not just whole words, are learned


def test_training_skips_and_counts_impossible_alignments():
    import numpy as np
    from iam_handwriting import Sample, Timer, adam_init, init_params, make_streams, render_word, train_step

    cfg = RunConfig(hidden=4)
    data = TASKS["words"].make_data(cfg, make_streams(0), lambda fn, items: [fn(i) for i in items], print)
    params = {k: v.astype(np.float32) for k, v in init_params(np.random.default_rng(0), hidden=4).items()}
    good = render_word("ant", np.random.default_rng(1))
    # 4 samples cannot carry 'nun' + 'nun' (6 labels): probability zero
    short = Sample("nunnun", good.traj[:4], [6, 10, 6, 6, 10, 6], good.xy[:4], good.pen_up[:4], np.zeros(4, dtype=int))
    before = {k: v.copy() for k, v in params.items()}
    nll_sum, n_chars, skipped = train_step(params, adam_init(params), [good, short], cfg.lr, cfg, data, Timer())
    assert skipped == 1 and n_chars == 3 and np.isfinite(nll_sum)
    assert any(not np.array_equal(before[k], params[k]) for k in params)  # the usable sequence still trains
    # a batch with nothing usable leaves the parameters alone
    frozen = {k: v.copy() for k, v in params.items()}
    assert train_step(params, adam_init(params), [short], cfg.lr, cfg, data, Timer())[2] == 1
    assert all(np.array_equal(frozen[k], params[k]) for k in params)
