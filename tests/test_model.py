"""The network, its hand-written gradients, the optimisers and the training loop, on small data."""
import dataclasses
import json
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnist_jax
from mnist_jax import Config, Hyper

SETUPS = {  # every network the CLI can build, small enough to check quickly
    "mlp-relu": Config(hidden=(32, 16)),
    "mlp-tanh": Config(hidden=(32,), activation="tanh"),
    "mlp-bn-dropout": Config(hidden=(32, 16), batchnorm=True, dropout=0.3),
    "resmlp": Config(model="resmlp", hidden=(16, 16, 16), batchnorm=True, dropout=0.2),
    "cnn-small": Config(model="cnn-small"),
    "cnn": Config(model="cnn", batchnorm=True, dropout=0.25),
}


def random_batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.random((n, 784), np.float32)), jnp.asarray(rng.integers(0, 10, n), jnp.int32)


def perturbed(model, seed=2):
    """Random (not freshly initialised) parameters, so that biases and batch-norm scales matter too."""
    leaves, treedef = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return dataclasses.replace(model, params=params)


@pytest.mark.parametrize("name", SETUPS)
def test_manual_gradients_match_jax_grad(name):
    model = perturbed(mnist_jax.init_params(jax.random.key(1), SETUPS[name].net()))
    images, labels = random_batch()
    key = jax.random.key(3)
    grad = jax.jit(mnist_jax.gradients, static_argnames="by_hand")
    auto_loss, (auto_log_probs, _), auto = grad(model, images, labels, key, by_hand=False)
    manual_loss, (manual_log_probs, _), manual = grad(model, images, labels, key, by_hand=True)
    np.testing.assert_allclose(auto_loss, manual_loss, rtol=1e-6)
    np.testing.assert_allclose(auto_log_probs, manual_log_probs, rtol=1e-5, atol=1e-6)
    # The hand-written gradients must have exactly the parameters' structure: a missing one would
    # otherwise be dropped silently when the leaves are paired up below.
    assert jax.tree.structure(manual) == jax.tree.structure(model.params)
    # Relative to the largest gradient anywhere: a bias just before batch norm has a true gradient
    # of exactly 0, so its own scale is float noise.
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(auto))
    for a, m in zip(jax.tree.leaves(auto), jax.tree.leaves(manual)):
        np.testing.assert_allclose(np.asarray(m) / scale, np.asarray(a) / scale, atol=1e-5)


@pytest.mark.parametrize("by_hand", [False, True])
def test_gradients_in_parts_equal_the_whole_batch(by_hand):
    """A CNN's step taken 32 images at a time (Hyper.part) has the whole batch's loss and gradient."""
    model = perturbed(mnist_jax.init_params(jax.random.key(1), Config(model="cnn-small", dropout=0.0).net()))
    images, labels = random_batch(96)
    whole_loss, (whole_log_probs, _), whole = mnist_jax.gradients(model, images, labels, jax.random.key(3), by_hand)
    loss, (log_probs, _), parts = mnist_jax.gradients_in_parts(model, images, labels, jax.random.key(3), by_hand, 32)
    np.testing.assert_allclose(loss, whole_loss, rtol=1e-6)
    np.testing.assert_allclose(log_probs, whole_log_probs, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(parts), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_only_a_cnn_without_batch_norm_is_split():
    on_cpu = jax.default_backend() == "cpu"
    assert mnist_jax.step_part("cnn", batchnorm=False) == (mnist_jax.CNN_PART if on_cpu else 0)
    assert mnist_jax.step_part("cnn", batchnorm=True) == 0  # its statistics are the whole batch's
    assert mnist_jax.step_part("mlp", batchnorm=False) == 0


def test_a_missing_hand_written_gradient_is_caught():
    """The structure check above fails when a backward pass forgets a parameter."""
    dense = mnist_jax.Dense(10)
    forgetful = dense._replace(backward=lambda params, x, dy: ({"W": dy.T @ x}, dy @ params["W"]))  # no "b"
    model = mnist_jax.init_params(jax.random.key(0), mnist_jax.serial(forgetful))
    images, labels = random_batch()
    _, _, manual = mnist_jax.gradients(model, images, labels, jax.random.key(0), by_hand=True)
    assert jax.tree.structure(manual) != jax.tree.structure(model.params)


@pytest.mark.parametrize("layer, shape", [
    (mnist_jax.BatchNorm(), (5, 4)), (mnist_jax.Conv(3, 3), (2, 6, 6, 2)), (mnist_jax.MaxPool(), (2, 5, 5, 3)),
    (mnist_jax.Tanh(), (3, 7)), (mnist_jax.Dense(4), (3, 5)), (mnist_jax.Relu(), (3, 7))])
def test_backward_matches_finite_differences(layer, shape):
    """d/dt L(x + t v) at t=0, by central differences in float64, against <dL/dx, v> from `backward`."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        p, out_shape = layer.init(jax.random.key(0), shape[1:])
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) + 0.3, p)
        x, v = jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=shape))
        weights = jnp.asarray(rng.normal(size=(shape[0],) + out_shape))
        ctx = mnist_jax.Ctx(train=True)

        def loss(x):
            y, cache = layer.forward(p, x, ctx)
            return (jnp.sin(y) * weights).sum(), (y, cache)

        _, (y, cache) = loss(x)
        _, dx = layer.backward(p, cache, jnp.cos(y) * weights)
        eps = 1e-6
        numeric = (loss(x + eps * v)[0] - loss(x - eps * v)[0]) / (2 * eps)
        np.testing.assert_allclose(float((dx * v).sum()), float(numeric), rtol=1e-6)


def test_log_softmax_is_stable_and_normalised():
    logits = jnp.array([[1000.0, 0.0, -1000.0] + [0.0] * 7, [0.0] * 10])
    out = mnist_jax.log_softmax(logits)
    assert jnp.isfinite(out).all()
    np.testing.assert_allclose(jnp.exp(out).sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[1], -np.log(10), rtol=1e-6)


def always_nine():
    """A one-layer model whose bias alone picks 9."""
    model = mnist_jax.init_params(jax.random.key(0), mnist_jax.serial(mnist_jax.Dense(10)))
    return dataclasses.replace(model, params=[{"W": jnp.zeros((10, 784)), "b": jnp.arange(10.0)}])


def test_loss_and_accuracy_on_known_values():
    model = always_nine()
    images, _ = random_batch(4)
    labels = jnp.array([9, 9, 0, 1])
    assert float(mnist_jax.accuracy(model, images, labels)) == 0.5
    expected = -np.mean(jax.nn.log_softmax(jnp.arange(10.0))[np.array([9, 9, 0, 1])])
    value, (log_probs, _) = mnist_jax.loss(model, images, labels)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(log_probs, mnist_jax.predict(model, images), rtol=1e-6)


def pattern_data(n_train=512, n_test=256):
    from conftest import pattern_digits
    return mnist_jax.Dataset(*pattern_digits(n_train, 0), *pattern_digits(n_test, 1))


def start(cfg, hyper):
    model = mnist_jax.init_params(jax.random.key(0), cfg.net())
    return mnist_jax.start_training(model, hyper)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_steps_lower_the_loss(optimizer):
    hyper = Hyper(lr=0.05 if optimizer == "sgd" else 0.002, optimizer=optimizer, total_steps=1000)
    state = start(Config(hidden=(64,)), hyper)
    data = pattern_data()
    x, y = jnp.asarray(mnist_jax.as_inputs(data.train_images[:128])), jnp.asarray(data.train_labels[:128], jnp.int32)
    before = float(mnist_jax.loss(state.model, x, y)[0])
    for i in range(10):
        state, value, correct = mnist_jax.update(state, x, y, jax.random.key(i), hyper)
    assert float(mnist_jax.loss(state.model, x, y)[0]) < 0.5 * before and int(state.step) == 10


def test_weight_decay_adds_the_l2_gradient():
    """One step from zero velocity: param <- param - lr * (gradient + weight_decay * param)."""
    state = start(Config(hidden=(8,), dropout=0.0), Hyper())
    x, y = random_batch()
    plain = mnist_jax.update(state, x, y, jax.random.key(1), Hyper(lr=0.1))[0]
    decayed = mnist_jax.update(state, x, y, jax.random.key(1), Hyper(lr=0.1, weight_decay=0.5))[0]
    for p, a, b in zip(*(jax.tree.leaves(s.model.params) for s in (state, plain, decayed))):
        np.testing.assert_allclose(a - b, 0.1 * 0.5 * p, atol=1e-6)


def test_momentum_zero_is_plain_sgd():
    state = start(Config(hidden=(8,), dropout=0.0), Hyper())
    x, y = random_batch()
    grads = jax.grad(lambda p: mnist_jax.loss(dataclasses.replace(state.model, params=p), x, y)[0])(state.model.params)
    new, _, _ = mnist_jax.update(state, x, y, jax.random.key(1), Hyper(lr=0.1, momentum=0.0))
    for p, g, n in zip(*(jax.tree.leaves(t) for t in (state.model.params, grads, new.model.params))):
        np.testing.assert_allclose(n, p - 0.1 * g, atol=1e-6)
    assert all(not leaf.any() for leaf in jax.tree.leaves(new.velocity))  # never read, left as it was


def test_one_adam_step_by_hand():
    """Step 1 from zero moments: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2, so each parameter moves
    by lr * g / (|g| + eps); step 2 checked against the formula written out in NumPy."""
    hyper = Hyper(lr=0.01, optimizer="adam", schedule="linear", total_steps=1000)
    state = start(Config(hidden=(8,), dropout=0.0), hyper)
    x, y = random_batch()
    grad_of = lambda model: jax.grad(lambda p: mnist_jax.loss(dataclasses.replace(model, params=p), x, y)[0])(
        model.params)
    g1 = grad_of(state.model)
    one, _, _ = mnist_jax.update(state, x, y, jax.random.key(0), hyper)
    for p, g, n in zip(*(jax.tree.leaves(t) for t in (state.model.params, g1, one.model.params))):
        np.testing.assert_allclose(n, p - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-4, atol=1e-7)
    g2 = grad_of(one.model)
    two, _, _ = mnist_jax.update(one, x, y, jax.random.key(0), hyper)
    lr2 = 0.01 * (1 - 1 / 1000)  # the linear schedule's second step
    for p, a, b, n in zip(*(jax.tree.leaves(t) for t in (one.model.params, g1, g2, two.model.params))):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        m = 0.9 * (0.1 * a) + 0.1 * b
        v = 0.999 * (0.001 * a * a) + 0.001 * b * b
        expected = np.asarray(p) - lr2 * (m / (1 - 0.9**2)) / (np.sqrt(v / (1 - 0.999**2)) + 1e-8)
        np.testing.assert_allclose(n, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "onecycle", "cosine"])
def test_learning_rate_schedules(schedule):
    hyper = Hyper(lr=0.1, schedule=schedule, total_steps=1000)
    rates = np.asarray(mnist_jax.learning_rate(hyper, np.arange(1000)))
    assert rates.max() == pytest.approx(0.1, rel=0.01) and rates[-1] < 0.001 and (rates >= 0).all()
    peak = int(rates.argmax())
    assert {"linear": peak == 0, "onecycle": 240 <= peak <= 260, "cosine": 40 <= peak <= 60}[schedule]
    assert (np.diff(rates[peak:]) <= 1e-9).all() and (np.diff(rates[:peak + 1]) >= -1e-9).all()


def test_as_inputs_scales_bytes_the_same_on_host_and_device():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    host = mnist_jax.as_inputs(images)
    assert host.dtype == np.float32 and host.shape == (5, 784) and host.max() <= 1.0
    np.testing.assert_allclose(host, images.reshape(5, 784) / 255, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mnist_jax.as_inputs(jnp.asarray(images))), host)


def test_train_epoch_takes_batches_in_the_given_order_and_leaves_the_rest_out():
    state = mnist_jax.start_training(always_nine(), Hyper())
    images = jnp.zeros((10, 28, 28), jnp.uint8)
    labels = jnp.asarray([9] * 8 + [0, 0], jnp.int32)
    hyper = Hyper(lr=1e-9, momentum=0.0, total_steps=2)
    accuracy = {}
    for name, order in (("ones labelled 0 last", np.arange(10)), ("ones labelled 0 first", np.arange(10)[::-1])):
        out = mnist_jax.train_epoch(state, images, labels, jnp.asarray(order, jnp.int32), jax.random.key(0),
                                    hyper, 4)
        accuracy[name] = float(out[2])
    # Two batches of 4: the last two images of the order sit out.
    assert accuracy == {"ones labelled 0 last": 1.0, "ones labelled 0 first": 0.75}


@pytest.mark.parametrize("options", [None, {"xla_cpu_no_such_option": True}])
def test_compiled_epoch_matches_plain_jit_and_survives_an_unknown_option(monkeypatch, options):
    if options is not None:  # an XLA that does not know the option must still train
        monkeypatch.setattr(mnist_jax, "CPU_COMPILER_OPTIONS", options)
    hyper = Hyper(0.05, 0.9, 1e-4, total_steps=8)
    state = start(Config(hidden=(16,), dropout=0.1), hyper)
    data = pattern_data(256, 8)
    args = (state, jnp.asarray(data.train_images), jnp.asarray(data.train_labels, jnp.int32),
            jnp.asarray(np.random.default_rng(0).permutation(256), jnp.int32), jax.random.key(1))
    epoch = partial(mnist_jax.train_epoch, hyper=hyper, batch_size=64)
    compiled = mnist_jax.compile_function(epoch, *args)(*args)
    plain = jax.jit(epoch)(*args)
    for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def train(cfg, data, **kwargs):
    cfg = cfg.resolved()
    return mnist_jax.train(cfg.net(), data, cfg.hyper(), cfg.epochs, cfg.batch_size, cfg.seed, log=lambda _: None,
                           **kwargs)


@pytest.mark.parametrize("grad", ["auto", "manual"])
def test_whole_loop_learns_small_data(grad):
    cfg = Config(hidden=(64,), epochs=3, grad=grad, batchnorm=True, dropout=0.1).resolved()
    lines, runs = [], []
    run = mnist_jax.train(cfg.net(), pattern_data(), cfg.hyper(), 3, 128, log=lines.append, on_epoch=runs.append)
    assert run.epochs[-1]["test_accuracy"] > 0.95
    assert len(lines) == 1 + 3 and "compiled in" in lines[0] and "samples/s" in lines[-1]
    assert [e["epoch"] for e in run.epochs] == [1, 2, 3] and len(runs) == 3
    assert set(run.epochs[0]) >= {"epoch", "seconds", "train_loss", "train_accuracy", "test_accuracy"}
    assert set(run.seconds) == {"setup", "compile", "train", "evaluate"}
    assert len(run.learning_rates) == 3 * (512 // 128) and run.learning_rates[0] == pytest.approx(mnist_jax.MODEL_DEFAULTS["mlp"]["lr"])
    bn = run.model.stats[1]
    assert float(np.abs(bn["mean"]).sum()) > 0  # the running averages moved from their start


@pytest.mark.parametrize("optimizer, schedule", [("adam", "onecycle"), ("sgd", "cosine")])
def test_other_optimisers_and_schedules_learn(optimizer, schedule):
    cfg = Config(hidden=(64,), epochs=3, optimizer=optimizer, schedule=schedule, lr=0.003 if optimizer == "adam" else 0.05)
    assert train(cfg, pattern_data()).epochs[-1]["test_accuracy"] > 0.95


def test_per_sample_sgd_runs_compiled():
    cfg = Config(hidden=(32,), epochs=1, batch_size=1, lr=0.01, momentum=0.0, dropout=0.0)
    assert train(cfg, pattern_data(300, 100)).epochs[-1]["test_accuracy"] > 0.9


def test_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(mnist_jax.UserError, match="--batch-size 600 is larger than the training set .300 images"):
        train(Config(hidden=(8,), batch_size=600), pattern_data(300, 10))


def test_same_seed_same_numbers_other_seed_other_numbers():
    data = pattern_data(256, 64)
    runs = [train(Config(hidden=(16,), epochs=2, seed=s, dropout=0.2), data) for s in (5, 5, 6)]
    strip = lambda r: [{k: v for k, v in e.items() if k != "seconds"} for e in r.epochs]
    assert strip(runs[0]) == strip(runs[1])
    assert strip(runs[0]) != strip(runs[2])


def test_divergence_stops_with_advice():
    with pytest.raises(mnist_jax.Diverged, match=r"epoch 1: the loss became (nan|inf) at learning rate --lr 1e\+30"):
        train(Config(hidden=(16,), epochs=3, lr=1e30, momentum=0.0), pattern_data(256, 64))


def test_divergence_in_a_later_epoch_keeps_the_last_finite_model(monkeypatch):
    real_epoch = mnist_jax.train_epoch

    def poisoned(state, *args, **kwargs):  # the second epoch's loss is NaN, as if the step size had blown up
        new, value, acc = real_epoch(state, *args, **kwargs)
        return new, jnp.where(state.step > 0, jnp.nan, value), acc

    monkeypatch.setattr(mnist_jax, "train_epoch", poisoned)
    seen = []
    with pytest.raises(mnist_jax.Diverged, match="epoch 2"):
        train(Config(hidden=(16,), epochs=3), pattern_data(256, 64), on_epoch=lambda run: seen.append(run.model))
    assert len(seen) == 1 and all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(seen[0].params))


def test_classification_report_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    report = mnist_jax.classification_report(labels, predicted)
    assert report["precision"][:3] == [0.5, 0.6667, 0.0]
    assert report["recall"][:3] == [0.5, 1.0, 0.0]
    assert report["f1"][1] == 0.8
    assert report["confusion_matrix"][0][:3] == [1, 1, 0] and report["confusion_matrix"][2][:3] == [1, 0, 0]
    assert "macro_f1" in report


def test_resmlp_needs_equal_sizes():
    with pytest.raises(mnist_jax.UserError, match="same size"):
        mnist_jax.build_net("resmlp", (64, 32))


def test_describe_reads_the_sizes_from_the_weights():
    describe = lambda cfg: mnist_jax.describe(mnist_jax.init_params(jax.random.key(0), cfg.net()))
    assert describe(Config()) == "784-512-512-10"
    assert describe(Config(model="resmlp", hidden=(16, 16))) == "784-16-16-10"
    assert describe(Config(model="cnn")) == "conv32-conv64-128-10"


def test_config_round_trips_through_json_and_fills_per_model_defaults():
    cfg = Config(hidden=(7, 8), dropout=0.5, model="resmlp")
    assert Config.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert dataclasses.replace(cfg, seed=3).seed == 3
    assert Config().resolved().epochs == mnist_jax.MODEL_DEFAULTS["mlp"]["epochs"]
    assert Config(model="cnn").resolved().epochs == mnist_jax.MODEL_DEFAULTS["cnn"]["epochs"]
    assert Config(model="cnn", epochs=7).resolved().epochs == 7


def test_augmentation_is_reproducible_and_changes_each_image():
    x = jnp.zeros((8, 28, 28)).at[:, 8:20, 12:16].set(1.0)  # a "1"
    a = mnist_jax.augment_images(jax.random.key(0), x)
    b = mnist_jax.augment_images(jax.random.key(0), x)
    c = mnist_jax.augment_images(jax.random.key(1), x)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 0.5 and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert len({np.asarray(img).tobytes() for img in a}) == 8  # every image its own change
    # The ink stays near the middle: shifts are at most a few pixels.
    ys, xs = np.indices((28, 28))
    for img in np.asarray(a):
        assert abs((ys * img).sum() / img.sum() - 13.5) < 4 and abs((xs * img).sum() / img.sum() - 13.5) < 4


def test_affine_with_no_change_is_the_identity():
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28))
    same = mnist_jax.affine(x, jnp.zeros((2, 2)), jnp.zeros(2), jnp.ones((2, 2)), jnp.zeros(2))
    np.testing.assert_allclose(same, x, atol=1e-5)


def test_the_bend_is_small_smooth_and_moves_the_ink():
    bend = np.asarray(mnist_jax.smooth_bend(jax.random.key(0), 16))
    assert bend.shape == (16, 2, 28, 28)
    assert np.abs(bend).max() <= mnist_jax.MAX_BEND + 1e-6 and np.abs(bend).max() > mnist_jax.MAX_BEND / 2
    # Smooth: neighbouring pixels move alike (at most the grid's greatest difference over its spacing).
    spacing = 27 / (mnist_jax.BEND_POINTS - 1)
    assert np.abs(np.diff(bend, axis=2)).max() <= 2 * mnist_jax.MAX_BEND / spacing + 1e-5
    assert np.abs(np.diff(bend, axis=3)).max() <= 2 * mnist_jax.MAX_BEND / spacing + 1e-5
    # Bent, a digit changes shape but keeps about its ink.
    x = jnp.zeros((16, 28, 28)).at[:, 6:22, 12:16].set(1.0)
    bent = np.asarray(mnist_jax.affine(x, jnp.zeros((16, 2)), jnp.zeros(16), jnp.ones((16, 2)), jnp.zeros(16),
                                       bend))
    assert np.abs(bent - np.asarray(x)).sum(axis=(1, 2)).min() > 5
    np.testing.assert_allclose(bent.sum(axis=(1, 2)), 64, rtol=0.25)


def test_augmentation_bends_the_digits(monkeypatch):
    x = jnp.zeros((8, 28, 28)).at[:, 6:22, 12:16].set(1.0)
    with_bend = np.asarray(mnist_jax.augment_images(jax.random.key(0), x))
    monkeypatch.setattr(mnist_jax, "smooth_bend", lambda key, b: jnp.zeros((b, 2, 28, 28)))
    without = np.asarray(mnist_jax.augment_images(jax.random.key(0), x))
    assert np.abs(with_bend - without).sum(axis=(1, 2)).min() > 1  # every image bent


def test_holes_only_take_ink_away_and_only_some_of_it():
    x = jnp.zeros((64, 28, 28)).at[:, 4:24, 4:24].set(1.0)  # the whole 20x20 box inked
    holed = np.asarray(mnist_jax.punch_holes(jax.random.key(0), x))
    assert (holed <= np.asarray(x)).all() and (holed >= 0).all()
    lost = (np.asarray(x) - holed).sum(axis=(1, 2))  # ink taken from each image
    one_hole = np.pi * mnist_jax.HOLE_RADIUS ** 2
    assert lost.max() <= mnist_jax.HOLES * 1.5 * one_hole  # small discs, at most HOLES of them
    # Each disc is cut with chance HOLE_CHANCE: some images keep all their ink, most lose some.
    assert 0 < (lost == 0).sum() < 32 and (lost > 0.5 * one_hole).sum() > 32


def test_training_with_augmentation_learns():
    cfg = Config(hidden=(64,), epochs=4, dropout=0.0).resolved()
    run = mnist_jax.train(cfg.net(), pattern_data(), cfg.hyper(), 4, 64, augment=mnist_jax.augment_images,
                          log=lambda _: None)
    assert run.epochs[-1]["test_accuracy"] > 0.9


class FakeTerminal:
    def __init__(self, tty=True):
        self.text, self.tty = "", tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def test_progress_line_updates_within_a_long_epoch_only(monkeypatch):
    calls = []
    real = mnist_jax.Progress.__call__
    monkeypatch.setattr(mnist_jax.Progress, "__call__", lambda self, done, steps: calls.append(int(done)))
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", FakeTerminal(tty=False))
        train(Config(hidden=(16,), epochs=1, batch_size=8), pattern_data(800, 16))
    assert calls == []  # output to a log or a pipe: compiled without the call back (so it can be cached)
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", FakeTerminal())
        train(Config(hidden=(16,), epochs=1, batch_size=8), pattern_data(800, 16))
    assert calls == list(range(10, 101, 10))  # every tenth of the 100 steps, from inside the compiled epoch
    monkeypatch.setattr(mnist_jax.Progress, "__call__", real)
    terminal = FakeTerminal()
    progress = mnist_jax.Progress(128, terminal)
    progress(10, 100)  # a fraction of a second in: nothing
    assert terminal.text == ""
    progress.started -= 6  # six seconds in
    progress(20, 100)
    assert terminal.text.startswith("\r  step 20 of 100, ") and "images/s" in terminal.text
    progress.clear()
    assert terminal.text.endswith("\r")
    log = FakeTerminal(tty=False)  # a log file: no updating line
    quiet = mnist_jax.Progress(128, log)
    quiet.started -= 6
    quiet(20, 100)
    assert log.text == ""


def test_max_pool_sends_each_blocks_gradient_to_one_input():
    """Each 2x2 block's gradient goes to its largest input; on a tie, to the first in reading order."""
    blocks = [[1, 5, 2, 3], [7, 7, 7, 7], [0, 2, 2, 1], [4, 1, 9, 9], [-3, -2, -1, -1], [0, 0, 0, 6]]
    x = np.zeros((1, 2, 2 * len(blocks), 1), np.float32)
    for i, (a, b, c, d) in enumerate(blocks):
        x[0, :, 2 * i:2 * i + 2, 0] = [[a, b], [c, d]]
    y, winners = mnist_jax.pool_winners(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y)[0, 0, :, 0], [5, 7, 2, 9, -1, 6])
    winner = np.asarray(winners)[0, 0, :, :, :, 0].transpose(1, 0, 2).reshape(len(blocks), 4)  # (block, a b c d)
    np.testing.assert_array_equal(winner.argmax(1), [1, 0, 1, 2, 2, 3])
    assert (winner.sum(1) == 1).all()
    pool = mnist_jax.MaxPool()
    dx = jax.grad(lambda x: pool.forward({}, x, mnist_jax.Ctx())[0].sum())(jnp.asarray(x))  # jax.grad's way
    np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0].reshape(2, -1, 2).transpose(1, 0, 2).reshape(-1, 4),
                                  winner)
