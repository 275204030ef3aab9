"""The network, its hand-written gradients, the SGD step and the training loop, on small data."""
import dataclasses
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnist_jax
from mnist_jax import Config

SETUPS = {  # every model the CLI can build, small enough to check quickly
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


@pytest.mark.parametrize("name", SETUPS)
def test_manual_gradients_match_jax_grad(name):
    net = mnist_jax.build_net(SETUPS[name])
    params, stats = mnist_jax.init_params(jax.random.key(1), net)
    # random (not freshly initialised) parameters, so biases and batch-norm scales matter too
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    images, labels = random_batch()
    key = jax.random.key(3)
    auto = jax.jit(mnist_jax.auto_gradients, static_argnums=0)(net, params, stats, images, labels, key)
    manual = jax.jit(mnist_jax.manual_gradients, static_argnums=0)(net, params, stats, images, labels, key)
    np.testing.assert_allclose(auto[0], manual[0], rtol=1e-6)
    # Relative to the largest gradient anywhere: a bias just before batch norm has a true gradient
    # of exactly 0, so its own scale is float noise.
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(auto[3]))
    for a, m in zip(jax.tree.leaves(auto[3]), jax.tree.leaves(manual[3])):
        np.testing.assert_allclose(np.asarray(m) / scale, np.asarray(a) / scale, atol=1e-5)
    assert jax.tree.structure(auto[3]) == jax.tree.structure(params)
    for a, m in zip(jax.tree.leaves(auto[1]), jax.tree.leaves(manual[1])):  # same running statistics
        np.testing.assert_allclose(a, m, rtol=1e-6)


@pytest.mark.parametrize("layer, shape", [(("batchnorm",), (5, 4)), (("conv", 3, 3), (2, 6, 6, 2)),
                                          (("maxpool",), (2, 5, 5, 3)), (("tanh",), (3, 7))])
def test_backward_matches_finite_differences(layer, shape):
    """d/dt L(x + t v) at t=0, by central differences in float64, against <dL/dx, v> from `backward`."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        kind = mnist_jax.LAYERS[layer[0]]
        p, s, out_shape = kind.init(jax.random.key(0), layer, shape[1:])
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) + 0.3, p)
        x, v = jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=shape))
        weights = jnp.asarray(rng.normal(size=(shape[0],) + out_shape))

        def loss(x):
            y, _, cache = kind.forward(layer, p, s, x, True, None)
            return (jnp.sin(y) * weights).sum(), cache

        _, cache = loss(x)
        y = kind.forward(layer, p, s, x, True, None)[0]
        _, dx = kind.backward(layer, p, cache, jnp.cos(y) * weights)
        eps = 1e-6
        numeric = (loss(x + eps * v)[0] - loss(x - eps * v)[0]) / (2 * eps)
        np.testing.assert_allclose(float((dx * v).sum()), float(numeric), rtol=1e-6)


def test_log_softmax_is_stable_and_normalised():
    logits = jnp.array([[1000.0, 0.0, -1000.0] + [0.0] * 7, [0.0] * 10])
    out = mnist_jax.log_softmax(logits)
    assert jnp.isfinite(out).all()
    np.testing.assert_allclose(jnp.exp(out).sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[1], -np.log(10), rtol=1e-6)


def test_loss_and_accuracy_on_known_values():
    net = (("dense", 10),)
    params = [{"w": jnp.zeros((10, 784)), "b": jnp.arange(10.0)}]  # always says 9
    images, _ = random_batch(4)
    labels = jnp.array([9, 9, 0, 1])
    assert float(mnist_jax.accuracy(net, params, [{}], images, labels)) == 0.5
    expected = -np.mean(jax.nn.log_softmax(jnp.arange(10.0))[np.array([9, 9, 0, 1])])
    np.testing.assert_allclose(mnist_jax.loss(net, params, [{}], images, labels), expected, rtol=1e-6)


def pattern_data(n_train=512, n_test=256):
    from conftest import pattern_digits
    return mnist_jax.Dataset(*pattern_digits(n_train, 0), *pattern_digits(n_test, 1))


def test_sgd_steps_lower_the_loss():
    net = mnist_jax.build_net(Config(hidden=(64,)))
    params, stats = mnist_jax.init_params(jax.random.key(0), net)
    velocity = jax.tree.map(jnp.zeros_like, params)
    data = pattern_data()
    x, y = jnp.asarray(mnist_jax.as_inputs(data.train_images[:128])), jnp.asarray(data.train_labels[:128], jnp.int32)
    before = float(mnist_jax.loss(net, params, stats, x, y))
    for i in range(10):
        params, stats, velocity, _, _ = mnist_jax.update(net, params, stats, velocity, x, y, jax.random.key(i),
                                                         jnp.float32(0.05), momentum=0.9)
    assert float(mnist_jax.loss(net, params, stats, x, y)) < 0.5 * before


def test_weight_decay_adds_the_l2_gradient():
    """One step from zero velocity: param <- param - lr * (gradient + weight_decay * param)."""
    net = mnist_jax.build_net(Config(hidden=(8,), dropout=0.0))
    params, stats = mnist_jax.init_params(jax.random.key(0), net)
    velocity = jax.tree.map(jnp.zeros_like, params)
    x, y = random_batch()
    lr, wd = jnp.float32(0.1), 0.5
    plain = mnist_jax.update(net, params, stats, velocity, x, y, jax.random.key(1), lr, 0.9, 0.0)[0]
    decayed = mnist_jax.update(net, params, stats, velocity, x, y, jax.random.key(1), lr, 0.9, wd)[0]
    for p, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain), jax.tree.leaves(decayed)):
        np.testing.assert_allclose(a - b, lr * wd * p, atol=1e-6)


def test_momentum_zero_is_plain_sgd():
    net = mnist_jax.build_net(Config(hidden=(8,), dropout=0.0))
    params, stats = mnist_jax.init_params(jax.random.key(0), net)
    velocity = jax.tree.map(jnp.zeros_like, params)
    x, y = random_batch()
    grads = jax.grad(lambda p: mnist_jax.loss(net, p, stats, x, y))(params)  # no dropout: train = eval
    new, _, new_velocity, _, _ = mnist_jax.update(net, params, stats, velocity, x, y, jax.random.key(1),
                                                  jnp.float32(0.1), 0.0)
    for p, g, n in zip(jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(new)):
        np.testing.assert_allclose(n, p - 0.1 * g, atol=1e-6)
    assert all(not leaf.any() for leaf in jax.tree.leaves(new_velocity))  # never read, left as it was


def test_as_inputs_scales_bytes_the_same_on_host_and_device():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    host = mnist_jax.as_inputs(images)
    assert host.dtype == np.float32 and host.shape == (5, 784) and host.max() <= 1.0
    np.testing.assert_allclose(host, images.reshape(5, 784) / 255, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mnist_jax.as_inputs(jnp.asarray(images))), host)


def epoch_inputs(n=10):
    """A model that always says 9, and n images of which all but the last two are labelled 9."""
    net = mnist_jax.build_net(Config(hidden=(4,), dropout=0.0))
    params, stats = mnist_jax.init_params(jax.random.key(0), net)
    params[-1]["b"] = jnp.arange(10.0) * 100  # the last layer's bias alone picks 9
    images = jnp.zeros((n, 28, 28), jnp.uint8)
    labels = jnp.asarray([9] * (n - 2) + [0, 0], jnp.int32)
    return net, params, stats, images, labels


def test_train_epoch_takes_batches_in_the_given_order_and_leaves_the_rest_out():
    net, params, stats, images, labels = epoch_inputs()
    velocity = jax.tree.map(jnp.zeros_like, params)
    hyper = mnist_jax.Hyper(lr=1e-9, momentum=0.0, weight_decay=0.0)
    accuracy = {}
    for name, order in (("ones labelled 0 last", np.arange(10)), ("ones labelled 0 first", np.arange(10)[::-1])):
        out = mnist_jax.train_epoch(net, "auto", 4, hyper, params, stats, velocity, images, labels,
                                    jnp.asarray(order, jnp.int32), jax.random.key(0), 0, 2)
        accuracy[name] = float(out[4])
    # Two batches of 4: the last two images of the order sit out.
    assert accuracy == {"ones labelled 0 last": 1.0, "ones labelled 0 first": 0.75}


@pytest.mark.parametrize("options", [None, {"xla_cpu_no_such_option": True}])
def test_compiled_epoch_matches_plain_jit_and_survives_an_unknown_option(monkeypatch, options):
    if options is not None:  # an XLA that does not know the option must still train
        monkeypatch.setattr(mnist_jax, "CPU_COMPILER_OPTIONS", options)
    net = mnist_jax.build_net(Config(hidden=(16,), dropout=0.1))
    params, stats = mnist_jax.init_params(jax.random.key(0), net)
    velocity = jax.tree.map(jnp.zeros_like, params)
    data = pattern_data(256, 8)
    args = (params, stats, velocity, jnp.asarray(data.train_images), jnp.asarray(data.train_labels, jnp.int32),
            jnp.asarray(np.random.default_rng(0).permutation(256), jnp.int32), jax.random.key(1), 0, 8)
    hyper = mnist_jax.Hyper(0.05, 0.9, 1e-4)
    compiled = mnist_jax.compile_epoch(net, "auto", 64, hyper, *args)(*args)
    plain = jax.jit(partial(mnist_jax.train_epoch, net, "auto", 64, hyper))(*args)
    for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad", ["auto", "manual"])
def test_whole_loop_learns_small_data(tmp_path, grad):
    cfg = Config(hidden=(64,), epochs=3, grad=grad, batchnorm=True, dropout=0.1)
    lines = []
    run = mnist_jax.train(cfg, pattern_data(), out=tmp_path, log=lines.append)
    assert run.epochs[-1]["test_accuracy"] > 0.95
    assert len(lines) == 1 + 3 and "compiled in" in lines[0] and "samples/s" in lines[-1]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert set(metrics["epochs"][0]) >= {"epoch", "seconds", "train_loss", "train_accuracy", "test_accuracy"}
    assert metrics["test_accuracy"] == run.epochs[-1]["test_accuracy"]
    assert len(metrics["f1"]) == 10 and np.array(metrics["confusion_matrix"]).sum() == 256


def test_per_sample_sgd_runs_compiled():
    cfg = Config(hidden=(32,), epochs=1, batch_size=1, lr=0.01, momentum=0.0, dropout=0.0)
    run = mnist_jax.train(cfg, pattern_data(300, 100), log=lambda _: None)
    assert run.epochs[-1]["test_accuracy"] > 0.9


def test_same_seed_same_numbers_other_seed_other_numbers():
    data = pattern_data(256, 64)
    runs = [mnist_jax.train(Config(hidden=(16,), epochs=2, seed=s, dropout=0.2), data, log=lambda _: None)
            for s in (5, 5, 6)]
    strip = lambda r: [{k: v for k, v in e.items() if k != "seconds"} for e in r.epochs]
    assert strip(runs[0]) == strip(runs[1])
    assert strip(runs[0]) != strip(runs[2])


def test_divergence_stops_with_advice_and_keeps_last_finite_params(tmp_path):
    data = pattern_data(256, 64)
    cfg = Config(hidden=(16,), epochs=3, lr=1e30, momentum=0.0)
    with pytest.raises(mnist_jax.Diverged, match=r"epoch 1: the loss became (nan|inf) at learning rate --lr 1e\+30"):
        mnist_jax.train(cfg, data, out=tmp_path, log=lambda _: None)
    assert not (tmp_path / "params.npz").exists()  # nothing non-finite was saved


def test_divergence_in_a_later_epoch_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    data = pattern_data(256, 64)
    real_epoch = mnist_jax.train_epoch
    calls = []

    def poisoned(*args):  # the second epoch's loss is NaN, as if the step size had blown up
        out = real_epoch(*args)
        calls.append(1)
        step0 = args[-2]  # train_epoch(..., order, key, step0, total_steps)
        return out[:3] + (jnp.where(step0 > 0, jnp.nan, out[3]),) + out[4:]

    monkeypatch.setattr(mnist_jax, "train_epoch", poisoned)
    with pytest.raises(mnist_jax.Diverged, match="epoch 2.*after epoch 1 are kept in"):
        mnist_jax.train(Config(hidden=(16,), epochs=3), data, out=tmp_path, log=lambda _: None)
    ckpt = mnist_jax.load_params(tmp_path / "params.npz")
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(ckpt.params))
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"][-1]["epoch"] == 1


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
        mnist_jax.build_net(Config(model="resmlp", hidden=(64, 32)))


def test_config_round_trips_through_json():
    cfg = Config(hidden=(7, 8), dropout=0.5, model="resmlp")
    assert Config.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert dataclasses.replace(cfg, seed=3).seed == 3
