"""The BLSTM against independent computations: a plain step-by-step LSTM,
central finite differences of every parameter, and padding invariance."""
import numpy as np
import pytest

from iam_handwriting import N_CLASSES, backward, ctc_loss, forward, init_params, model_shape, transfer_params

ARCHITECTURES = {
    "bidirectional": dict(layers=1, bidirectional=True),
    "unidirectional": dict(layers=1, bidirectional=False),
    "two_layers": dict(layers=2, bidirectional=True),
}


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def reference_forward(params, x):
    """One unpadded sequence x (T, D), one step at a time, textbook LSTM equations.

    Gate blocks [i, f, g, o]; the backward direction runs over reversed time.
    Returns log-probabilities (T, K).
    """
    layers, R, H = model_shape(params)
    inp = x
    for layer in range(layers):
        outs = []
        for d in range(R):
            Wx, Wh, b = (params[f"lstm{layer}_{n}"][d] for n in ("Wx", "Wh", "b"))
            seq = inp if d == 0 else inp[::-1]
            h, c, hs = np.zeros(H), np.zeros(H), []
            for x_t in seq:
                z = x_t @ Wx + h @ Wh + b
                i, f, g, o = sigmoid(z[:H]), sigmoid(z[H:2 * H]), np.tanh(z[2 * H:3 * H]), sigmoid(z[3 * H:])
                c = f * c + i * g
                h = o * np.tanh(c)
                hs.append(h)
            hs = np.array(hs)
            outs.append(hs if d == 0 else hs[::-1])
        inp = np.concatenate(outs, axis=1)
    logits = inp @ params["out_W"] + params["out_b"]
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def batch(rng, D=3, lengths=(7, 4, 6)):
    T = max(lengths)
    X = np.zeros((T, len(lengths), D))
    for b, n in enumerate(lengths):
        X[:n, b] = rng.normal(size=(n, D))
    return X, np.array(lengths)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_forward_equals_step_by_step_reference(arch):
    rng = np.random.default_rng(0)
    params = init_params(rng, hidden=5, **ARCHITECTURES[arch])
    X, lengths = batch(rng)
    log_probs, _ = forward(params, X, lengths)
    assert log_probs.shape == (X.shape[0], X.shape[1], N_CLASSES)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(log_probs[:n, b], reference_forward(params, X[:n, b]), atol=1e-12)


def central_differences(params, loss, name, eps=1e-6):
    """d loss(params) / d params[name] by central finite differences (float64)."""
    p = params[name]
    numeric = np.zeros_like(p)
    for idx in np.ndindex(p.shape):
        orig = p[idx]
        p[idx] = orig + eps
        up = loss(params)
        p[idx] = orig - eps
        numeric[idx] = (up - loss(params)) / (2 * eps)
        p[idx] = orig
    return numeric


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_parameter_gradient_equals_central_finite_differences(arch):
    rng = np.random.default_rng(1)
    params = init_params(rng, hidden=3, **ARCHITECTURES[arch])
    for k in params:  # move away from the zero biases so every entry matters
        params[k] = params[k] + rng.normal(scale=0.3, size=params[k].shape)
    X, lengths = batch(rng, lengths=(6, 4, 5))
    targets = [[1, 2], [3], [2, 2]]

    def loss(p):
        log_probs, _ = forward(p, X, lengths)
        return ctc_loss(log_probs, lengths, targets)[0].sum()

    log_probs, cache = forward(params, X, lengths)
    grads = backward(params, cache, ctc_loss(log_probs, lengths, targets)[1])
    assert grads.keys() == params.keys()
    for name, p in params.items():
        numeric = central_differences(params, loss, name)
        assert grads[name].shape == p.shape
        np.testing.assert_allclose(grads[name], numeric, atol=1e-7, rtol=1e-5, err_msg=name)
        assert np.abs(numeric).max() > 1e-3, name  # the check compares something non-trivial


def test_dropout_gradients_equal_central_finite_differences_for_a_fixed_draw():
    """Dropout on both layers' outputs: with the draw held fixed the loss is a
    smooth function of the weights, and backward must be its gradient."""
    rng = np.random.default_rng(4)
    params = init_params(rng, hidden=3, **ARCHITECTURES["two_layers"])
    for k in params:
        params[k] = params[k] + rng.normal(scale=0.3, size=params[k].shape)
    X, lengths = batch(rng, lengths=(6, 4, 5))
    targets = [[1, 2], [3], [2, 2]]
    keep = (rng.random((2, 6, 3, 6)) >= 0.4) / 0.6  # (layers, T, B, R*H)

    def loss(p):
        return ctc_loss(forward(p, X, lengths, keep)[0], lengths, targets)[0].sum()

    log_probs, cache = forward(params, X, lengths, keep)
    grads = backward(params, cache, ctc_loss(log_probs, lengths, targets)[1])
    plain_lp, plain_cache = forward(params, X, lengths)
    plain = backward(params, plain_cache, ctc_loss(plain_lp, lengths, targets)[1])
    for name, p in params.items():
        numeric = central_differences(params, loss, name)
        np.testing.assert_allclose(grads[name], numeric, atol=1e-7, rtol=1e-5, err_msg=name)
        assert not np.allclose(grads[name], plain[name]), name  # the draw changes every gradient


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padding_does_not_change_outputs_or_gradients(arch):
    rng = np.random.default_rng(2)
    params = init_params(rng, hidden=4, **ARCHITECTURES[arch])
    X, lengths = batch(rng, lengths=(5, 9, 7))
    target = [[1, 3]]
    # the first sequence alone
    alone_lp, alone_cache = forward(params, X[:5, :1], lengths[:1])
    alone_grads = backward(params, alone_cache, ctc_loss(alone_lp, lengths[:1], target)[1])
    # the same sequence padded to T = 9 inside a batch, with garbage in its padding
    X_padded = X.copy()
    X_padded[5:, 0] = 100.0
    lp, cache = forward(params, X_padded, lengths)
    np.testing.assert_allclose(lp[:5, 0], alone_lp[:, 0], atol=1e-12)
    np.testing.assert_allclose(lp[:5, 1:], forward(params, X[:, 1:], lengths[1:])[0][:5], atol=1e-12)
    grad_logits = np.zeros_like(lp)
    grad_logits[:5, 0] = ctc_loss(alone_lp, lengths[:1], target)[1][:, 0]
    grad_logits[5:, 0] = 7.0  # beyond the length: must be ignored
    grads = backward(params, cache, grad_logits)
    for name in params:
        np.testing.assert_allclose(grads[name], alone_grads[name], atol=1e-12, err_msg=name)


def test_init_params_shapes_and_forget_bias():
    params = init_params(np.random.default_rng(0), hidden=7, layers=2, bidirectional=True)
    assert params["lstm0_Wx"].shape == (2, 3, 28)
    assert params["lstm1_Wx"].shape == (2, 14, 28)
    assert params["lstm0_Wh"].shape == (2, 7, 28)
    assert params["out_W"].shape == (14, N_CLASSES)
    assert all(p.dtype == np.float64 for p in params.values())
    for layer in range(2):
        b = params[f"lstm{layer}_b"]
        assert np.all(b[:, 7:14] == 1.0) and np.all(b[:, :7] == 0) and np.all(b[:, 14:] == 0)
    assert model_shape(params) == (2, 2, 7)
    uni = init_params(np.random.default_rng(0), hidden=7, bidirectional=False)
    assert uni["out_W"].shape == (7, N_CLASSES) and model_shape(uni) == (1, 1, 7)


def test_float32_forward_follows_float64_closely():
    rng = np.random.default_rng(3)
    params = init_params(rng, hidden=8)
    X, lengths = batch(rng)
    lp64, _ = forward(params, X, lengths)
    lp32, _ = forward({k: v.astype(np.float32) for k, v in params.items()}, X, lengths)
    assert lp32.dtype == np.float32
    mask = np.arange(X.shape[0])[:, None] < lengths
    np.testing.assert_allclose(lp32[mask], lp64[mask], atol=1e-5)


def one_step_case(layers):
    """(params, samples, data) for one training step by hand: two sequences of 6 and 9 steps, 3 features."""
    import iam_handwriting as ih
    rng = np.random.default_rng(0)
    params = init_params(rng, hidden=4, layers=layers, in_dim=3, n_classes=4)
    samples = [ih.Sample("ab", rng.normal(size=(n, 3)), [1, 2], np.zeros((n, 2)), np.zeros(n), None) for n in (6, 9)]
    return params, samples, ih.TaskData("abc", {}, None, 2, np.zeros(3), np.ones(3), 0.0, [], {})


def test_weight_noise_takes_the_gradient_at_noisy_weights_and_updates_the_clean_ones():
    import dataclasses
    import iam_handwriting as ih
    params, samples, data = one_step_case(layers=1)
    cfg = dataclasses.replace(ih.RunConfig(), weight_noise=0.1, grad_clip=1e6)
    noisy_run = {k: v.copy() for k, v in params.items()}
    ih.train_step(noisy_run, ih.adam_init(noisy_run), samples, 0.01, cfg, data, ih.Timer(), None,
                  np.random.default_rng(7))
    draw = np.random.default_rng(7)
    at = {k: v + draw.normal(0.0, 0.1, v.shape) for k, v in params.items()}
    X, lengths = ih.pad_batch(samples, data.input_shift, data.input_scale)
    grads = ih.part_gradients(at, X, lengths, [s.labels for s in samples], 2)[0]
    by_hand = {k: v.copy() for k, v in params.items()}
    ih.adam_step(by_hand, grads, ih.adam_init(by_hand), 0.01)
    for k in params:
        np.testing.assert_allclose(noisy_run[k], by_hand[k], rtol=1e-12, atol=1e-15)
    clean = {k: v.copy() for k, v in params.items()}
    ih.train_step(clean, ih.adam_init(clean), samples, 0.01, dataclasses.replace(cfg, weight_noise=0.0), data,
                  ih.Timer(), None, np.random.default_rng(7))
    assert not np.allclose(clean["out_W"], noisy_run["out_W"])


def test_dropout_takes_the_gradient_under_the_steps_draw_from_the_noise_stream():
    import dataclasses
    import iam_handwriting as ih
    params, samples, data = one_step_case(layers=2)
    cfg = dataclasses.replace(ih.RunConfig(), dropout=0.3, grad_clip=1e6)
    run = {k: v.copy() for k, v in params.items()}
    ih.train_step(run, ih.adam_init(run), samples, 0.01, cfg, data, ih.Timer(), None, np.random.default_rng(7))
    kept = np.random.default_rng(7).random((2, 9, 2, 8), dtype=np.float32) >= 0.3  # (layers, T, B, R*H)
    X, lengths = ih.pad_batch(samples, data.input_shift, data.input_scale)
    grads = ih.part_gradients(params, X, lengths, [s.labels for s in samples], 2, None, kept, 0.3)[0]
    by_hand = {k: v.copy() for k, v in params.items()}
    ih.adam_step(by_hand, grads, ih.adam_init(by_hand), 0.01)
    for k in params:
        np.testing.assert_allclose(run[k], by_hand[k], rtol=1e-12, atol=1e-15)
    clean = {k: v.copy() for k, v in params.items()}
    ih.train_step(clean, ih.adam_init(clean), samples, 0.01, dataclasses.replace(cfg, dropout=0.0), data,
                  ih.Timer(), None, np.random.default_rng(7))
    assert not np.allclose(clean["out_W"], run["out_W"])


def test_transfer_params_keeps_the_lstm_and_the_output_of_shared_characters():
    fresh = init_params(np.random.default_rng(0), 4, 2, True, 3, 1 + 4)  # alphabet "abxy"
    source = init_params(np.random.default_rng(1), 4, 2, True, 3, 1 + 3)  # alphabet "yab"
    moved = transfer_params(fresh, "abxy", source, "yab")
    assert all(np.array_equal(moved[k], source[k]) for k in source if k.startswith("lstm"))
    for to, of in ((0, 0), (1, 2), (2, 3), (4, 1)):  # blank, a, b, y
        assert np.array_equal(moved["out_W"][:, to], source["out_W"][:, of]) and moved["out_b"][to] == source["out_b"][of]
    assert np.array_equal(moved["out_W"][:, 3], fresh["out_W"][:, 3])  # x: not in the source, fresh
    assert fresh["out_W"] is not moved["out_W"] and not np.array_equal(fresh["out_W"], moved["out_W"])
