"""A short fixed-seed training run must actually learn."""
import dataclasses

from iam_handwriting import QUICK_OVERRIDES, RunConfig, train


def test_quick_run_learns_to_read_unseen_renderings():
    cfg = dataclasses.replace(RunConfig(seed=0), **QUICK_OVERRIDES)
    result = train(cfg, verbose=False)  # the contents of run.json
    assert result["schema_version"] == 1
    first, last = result["history"][0], result["history"][-1]
    assert first["in_vocab"]["cer"] > 0.5  # the untrained start is far from reading
    assert last["train_loss"] < first["train_loss"] / 5
    # measured 0.017 (seed 0, 6 epochs, H = 32); the bound leaves room for BLAS differences
    assert result["final"]["in_vocab"]["cer"] < 0.05
    assert result["final"]["in_vocab"]["word_acc"] > 0.85
    assert result["final"]["held_out"]["cer"] < 0.2  # letters, not just whole words, are learned
