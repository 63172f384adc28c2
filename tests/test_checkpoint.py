"""Long runs: a checkpoint after every epoch, --resume to the same result as an
uninterrupted run, and early stopping that keeps the best validation epoch."""
import dataclasses
import json

import numpy as np
import pytest

import iam_handwriting as ih


def quick_lines(**kw):
    """The lines task at a size that trains a few epochs in seconds."""
    base = dict(task="lines", hidden=8, epochs=4, batch_size=8, lines_per_epoch=24, eval_lines_per_writer=1,
                workers=1, lr=1e-2)
    return ih.check_config(dataclasses.replace(ih.RunConfig(), **{**base, **kw}))


def timeless(result):
    """run.json's content that must not depend on timing or on the process's memory."""
    history = [{k: v for k, v in e.items() if k != "seconds"} for e in result["history"]]
    return history, result["final"], result["predictions"], result["best_epoch"], result["skipped"]


class Interrupt(KeyboardInterrupt):
    pass


def interrupted_after(epoch, monkeypatch):
    """Make the checkpoint write of `epoch` the last thing a run does, as Ctrl-C right after it would."""
    real = ih.write_output

    def write_then_stop(path, data, what, durable=True):
        real(path, data, what, durable)
        if what == "checkpoint" and ih.load_checkpoint(path, cfg_seen[0]).epoch == epoch:
            raise Interrupt()
    cfg_seen = []
    monkeypatch.setattr(ih, "write_output", write_then_stop)
    return cfg_seen


@pytest.mark.parametrize("patience", [0, 2])
def test_resume_gives_the_result_of_an_uninterrupted_run(tmp_path, monkeypatch, patience):
    cfg = quick_lines(patience=patience)
    _, whole = ih.train_and_evaluate(cfg, verbose=False, checkpoint_to=str(tmp_path / "whole.ckpt"))
    ckpt = str(tmp_path / "broken.ckpt")
    interrupted_after(2, monkeypatch).append(dataclasses.replace(cfg, alphabet=""))
    with pytest.raises(Interrupt):
        ih.train_and_evaluate(cfg, verbose=False, checkpoint_to=ckpt)
    monkeypatch.undo()
    assert ih.load_checkpoint(ckpt, cfg).epoch == 2
    _, resumed = ih.train_and_evaluate(cfg, verbose=False, checkpoint_to=ckpt, resume=True)
    assert timeless(resumed) == timeless(whole)


def test_early_stopping_keeps_the_best_epoch_and_stops(tmp_path):
    """lr so high that validation gets worse after the first epochs: the kept
    weights are the best epoch's, and training stops `patience` epochs later."""
    cfg = quick_lines(patience=1, epochs=30, lr=0.3, grad_clip=1e6)
    params, result = ih.train_and_evaluate(cfg, verbose=False)
    history, best = result["history"], result["best_epoch"]
    cers = [(e["validation"]["cer"], e["validation"]["loss"]) for e in history]
    assert best == 1 + cers.index(min(cers))
    assert len(history) == min(best + 1, 30)
    assert result["final"]["validation"]["cer"] == history[best - 1]["validation"]["cer"]


def test_a_checkpoint_from_other_settings_is_refused(tmp_path):
    cfg = quick_lines(epochs=1)
    ckpt = str(tmp_path / "c.ckpt")
    ih.train_and_evaluate(cfg, verbose=False, checkpoint_to=ckpt)
    with pytest.raises(ih.UserError, match="other settings .*hidden 8"):
        ih.load_checkpoint(ckpt, dataclasses.replace(cfg, hidden=9))
    (tmp_path / "bad.ckpt").write_bytes(b"not a zip")
    with pytest.raises(ih.UserError, match="not a usable checkpoint"):
        ih.load_checkpoint(str(tmp_path / "bad.ckpt"), cfg)
    with pytest.raises(ih.UserError, match="no checkpoint"):
        ih.load_checkpoint(str(tmp_path / "missing.ckpt"), cfg)


def test_the_cli_keeps_a_checkpoint_until_the_model_is_written(tmp_path):
    """--save-model M writes M.checkpoint every epoch and removes it once M is written;
    --resume without --save-model is refused in one line."""
    code = ih.main(["--task", "lines", "--quick", "--epochs", "1", "--quiet", "--save-model", str(tmp_path / "m.npz")])
    assert code == 0 and (tmp_path / "m.npz").exists() and not (tmp_path / "m.npz.checkpoint").exists()
    assert ih.main(["--task", "lines", "--quick", "--resume"]) == 2


def test_a_checkpoint_member_that_declares_too_much_is_refused_before_it_is_read(tmp_path):
    """A zip bomb: a small file whose member inflates to far more than the config's arrays."""
    import zipfile
    cfg = quick_lines(epochs=1)
    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("params/out_W.npy", b"\0" * (64 * 2**20))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(ih.UserError, match="declares 67,108,864 bytes"):
        ih.load_checkpoint(str(bomb), cfg)


def test_a_fifo_where_the_checkpoint_goes_is_refused_before_any_work(tmp_path, capsys):
    """Reading it to resume, or rewriting it after an epoch, would block forever."""
    import os
    os.mkfifo(tmp_path / "m.npz.checkpoint")
    for extra in ([], ["--resume"]):
        code = ih.main(["--task", "lines", "--quick", "--quiet", "--save-model", str(tmp_path / "m.npz"), *extra])
        assert code == 2 and "is a FIFO or a device, not a regular file" in capsys.readouterr().err
