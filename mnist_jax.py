"""Train a neural network on MNIST in JAX, from scratch, then read your own handwriting with it.

One file, no framework, to be read top to bottom: first the learning core (a layer, the forward pass,
softmax, the loss, its gradient, the SGD step, the training loop), then the other layers, the data,
checkpoints, your own photos, plots and the command line.

    pip install -r requirements.txt
    python mnist_jax.py                       # download MNIST to data/, train, save runs/mlp-1/
    python mnist_jax.py predict my_digit.jpg  # which digit is in this photo? (the last run's model)
    python mnist_jax.py serve                 # draw digits in your browser
    python mnist_jax.py --help                # every flag, with its default

In Python: `from mnist_jax import predict_digit; predict_digit("my_digit.jpg")`.
Measured accuracy and speed, and the classic setups, are in README.md.
"""
from __future__ import annotations

import time
STARTED = time.perf_counter()  # when this module began loading: the run's "import and start" time

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

# Plumbing, used from section 3 on (files, downloads, the command line):
import argparse, base64, errno, gc, gzip, hashlib, http.client, http.server, importlib.util, io, ipaddress  # noqa: E401
import json, math, os  # noqa: E401
import signal, socket, socketserver, struct, sys, tempfile, threading, urllib.error, urllib.parse  # noqa: E401
import urllib.request, warnings, zipfile, zlib  # noqa: E401
from pathlib import Path
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage  # filters and connected components, for photos (section 5)


# =============================================================================
# 1. The learning core: a layer, the forward pass, the loss, its gradient, SGD
# =============================================================================
# A layer is built by a function such as Dense(512), as in JAX's stax, and is
# three functions that remember the layer's settings (batch norm has a fourth, below):
#   init(key, in_shape)         -> (params, out_shape)   random starting weights
#   forward(params, x, ctx)     -> (y, cache)            the output, and what backward needs
#   backward(params, cache, dy) -> (grads, dx)           the chain rule, written by hand
# x is a batch, one example per row. jax.grad never calls `backward`: it is
# there to read, and for --grad manual, which uses it instead of jax.grad.

class Layer(NamedTuple):
    init: Callable
    forward: Callable
    backward: Callable
    running: Any = None  # batch norm only: a Running (start, update) that keeps its running statistics


class Ctx(NamedTuple):
    """What a forward pass needs besides the weights."""
    train: bool = False  # dropout and batch norm behave differently while training
    key: Any = None      # the random key for dropout's masks
    stats: Any = ()      # this layer's running statistics (batch norm only)


def Dense(n_out: int) -> Layer:
    """A fully connected layer, y = W x + b: every output unit sees every input."""
    def init(key, in_shape):
        (n_in,) = in_shape
        # Scaled by 1/sqrt(n_in) so that each output starts with about unit variance.
        W = jax.random.normal(key, (n_out, n_in), jnp.float32) / np.sqrt(n_in)
        return {"W": W, "b": jnp.zeros(n_out, jnp.float32)}, (n_out,)

    def forward(params, x, ctx):
        # y = W x + b for every image x, a row of the batch. (Why W @ x.T: see "Speed notes" at the end.)
        return (params["W"] @ x.T).T + params["b"], x

    def backward(params, x, dy):
        """y = W x + b  =>  dL/dW = dy x^T (summed over the batch),  dL/db = sum of dy,  dL/dx = W^T dy."""
        return {"W": dy.T @ x, "b": dy.sum(0)}, dy @ params["W"]

    return Layer(init, forward, backward)


def no_params(key, in_shape):
    return {}, in_shape


def Relu() -> Layer:
    """y = max(x, 0): the bend that lets a stack of layers learn more than one straight-line map."""
    def forward(params, x, ctx):
        return jax.nn.relu(x), x

    def backward(params, x, dy):
        """dy/dx = 1 where x > 0, else 0."""
        return {}, jnp.where(x > 0, dy, 0.0)

    return Layer(no_params, forward, backward)


class Running(NamedTuple):
    """Numbers a layer keeps across training steps for evaluation (batch norm's mean and variance)."""
    start: Callable   # start(params) -> statistics before training
    update: Callable  # update(statistics, cache of a training forward pass) -> new statistics


def serial(*layers: Layer) -> Layer:
    """Layers applied one after another. The result is a layer too: a whole network is one."""
    def init(key, in_shape):
        params = []
        for layer, layer_key in zip(layers, jax.random.split(key, len(layers))):
            p, in_shape = layer.init(layer_key, in_shape)
            params.append(p)
        return params, in_shape

    def forward(params, x, ctx):
        caches = []
        for i, (layer, p, stats) in enumerate(zip(layers, params, ctx.stats)):
            key = None if ctx.key is None else jax.random.fold_in(ctx.key, i)  # a different key per layer
            x, cache = layer.forward(p, x, Ctx(ctx.train, key, stats))
            caches.append(cache)
        return x, caches

    def backward(params, caches, dy):
        """The chain rule: each layer turns dL/d(its output) into dL/d(its input), the last layer first."""
        grads = [None] * len(layers)
        for i in reversed(range(len(layers))):
            grads[i], dy = layers[i].backward(params[i], caches[i], dy)
        return grads, dy

    def start(params):
        return [layer.running.start(p) if layer.running else () for layer, p in zip(layers, params)]

    def update(stats, caches):
        return [layer.running.update(s, c) if layer.running else s for layer, s, c in zip(layers, stats, caches)]

    return Layer(init, forward, backward, Running(start, update))


@partial(jax.tree_util.register_dataclass, data_fields=["params", "stats"], meta_fields=["net"])
@dataclass(frozen=True)
class Model:
    """A network with its numbers: `net` (the layers, fixed), `params` (what training learns) and
    `stats` (batch norm's running averages; empty for other networks). jit takes it as one argument."""
    net: Layer
    params: Any
    stats: Any


def init_params(key: jax.Array, net: Layer) -> Model:
    """Random starting parameters for `net` (a serial of layers taking 784 pixels to 10 scores).

    Args:
      key: a jax.random key; the same key gives the same parameters.
      net: the network, e.g. serial(Dense(512), Relu(), Dense(10)).
    """
    params, out_shape = net.init(key, (784,))
    assert out_shape == (10,), f"the network must end in 10 scores, one per digit, not {out_shape}"
    return Model(net, params, net.running.start(params))


def forward(model: Model, images: jax.Array, train: bool = False, key: jax.Array | None = None):
    """The network's 10 scores (logits) for each image (B, 784), and the caches for `backward`."""
    return model.net.forward(model.params, images, Ctx(train, key, model.stats))


def log_softmax(logits: jax.Array) -> jax.Array:
    """log softmax(z)_i = log(exp(z_i) / sum_j exp(z_j)), computed as z_i - m - log(sum_j exp(z_j - m))
    with m = max(z), so that no exp overflows."""
    # m cancels out of the result, so its gradient is 0 anyway: stop_gradient just spares jax.grad the max.
    shifted = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.exp(shifted).sum(axis=-1, keepdims=True))


def predict(model: Model, images: jax.Array) -> jax.Array:
    """Log-probabilities (B, 10) of each digit, for images (B, 784) with pixel values in [0, 1]."""
    logits, _ = forward(model, images)
    return log_softmax(logits)


def nll(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of the true labels, in nats: 0 when the model is sure and right."""
    return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=1).mean()


def loss(model: Model, images: jax.Array, labels: jax.Array, train: bool = False, key: jax.Array | None = None):
    """What training makes small: the mean negative log-likelihood of the labels (nats).

    Args:
      model: the network and its numbers.
      images: (B, 784) pixel values in [0, 1];  labels: (B,) digits.
      train: dropout on, and batch norm on this batch's statistics;  key: dropout's random key.
    Returns:
      (loss, (log_probs, caches)): the number to differentiate, and what the training step also
      uses: the predictions (for the accuracy) and the caches (batch norm, the backward pass).
    """
    logits, caches = forward(model, images, train, key)
    log_probs = log_softmax(logits)
    return nll(log_probs, labels), (log_probs, caches)


def accuracy(model: Model, images: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction of images whose most probable digit is the label."""
    return (predict(model, images).argmax(axis=1) == labels).mean()


def gradients(model: Model, images: jax.Array, labels: jax.Array, key: jax.Array, by_hand: bool = False):
    """(loss, (log_probs, caches), dLoss/dparams) on one training batch.

    jax.grad differentiates `loss`. By hand (--grad manual): for softmax followed by
    the NLL, dLoss/dlogits = (softmax(logits) - onehot(label)) / B, and the layers'
    `backward` functions carry that back to every weight, the last layer first.
    """
    if not by_hand:
        loss_of = lambda params: loss(dataclasses.replace(model, params=params), images, labels, True, key)
        (value, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(model.params)
        return value, aux, grads
    value, (log_probs, caches) = loss(model, images, labels, True, key)
    dlogits = (jnp.exp(log_probs) - jax.nn.one_hot(labels, 10, dtype=log_probs.dtype)) / len(labels)
    grads, _ = model.net.backward(model.params, caches, dlogits)
    return value, (log_probs, caches), grads


class Hyper(NamedTuple):
    """Settings of the training step, fixed for a run. jit compiles them in as constants,
    so a term that is 0 (momentum, weight decay) costs nothing."""
    lr: float = 0.05            # the peak learning rate (the command line's comes from MODEL_DEFAULTS)
    momentum: float = 0.9       # SGD's momentum (0: plain SGD)
    weight_decay: float = 0.0   # L2 penalty
    optimizer: str = "sgd"      # or "adam"
    schedule: str = "linear"    # how the learning rate changes over the run: linear, onecycle, cosine
    total_steps: int = 1        # steps in the whole run, for the schedule
    grad: str = "auto"          # "auto": jax.grad; "manual": the backward passes written by hand
    part: int = 0               # images per forward and backward pass within a step, if it divides the
                                # batch; 0: all at once (a CNN on a CPU takes 32: see gradients_in_parts)


def learning_rate(hyper: Hyper, step: jax.Array) -> jax.Array:
    """The learning rate at `step` (0, 1, ... total_steps - 1), as a fraction of the run t = step / total:
    linear:   lr * (1 - t), from lr down to 0;
    onecycle: up from lr/25 to lr over the first 25% of the steps, then down to 0 in a straight line;
    cosine:   up from 0 to lr over the first 5%, then lr * (1 + cos(pi * s)) / 2 down to 0 (s: 0 -> 1)."""
    t = step / hyper.total_steps
    if hyper.schedule == "linear":
        return hyper.lr * (1 - t)
    warm = 0.25 if hyper.schedule == "onecycle" else 0.05
    start = hyper.lr / 25 if hyper.schedule == "onecycle" else 0.0
    up = start + (hyper.lr - start) * t / warm
    s = (t - warm) / (1 - warm)
    down = hyper.lr * (1 - s) if hyper.schedule == "onecycle" else hyper.lr * (1 + jnp.cos(jnp.pi * s)) / 2
    return jnp.where(t < warm, up, down)


ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


def adam(params, grads, moments, lr, t):
    """One Adam step (Kingma and Ba, 2015): a step size for each parameter from its gradients' history.

        m <- b1 m + (1 - b1) g          the gradient's running mean (a momentum)
        v <- b2 v + (1 - b2) g^2        its running mean square (how large this parameter's gradients are)
        m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)     m and v start at 0: this undoes that bias
        param <- param - lr * m_hat / (sqrt(v_hat) + eps)

    with b1 = 0.9, b2 = 0.999, eps = 1e-8 and t the number of steps taken, counting this one.
    """
    m, v = moments
    m = jax.tree.map(lambda m, g: ADAM_B1 * m + (1 - ADAM_B1) * g, m, grads)
    v = jax.tree.map(lambda v, g: ADAM_B2 * v + (1 - ADAM_B2) * g * g, v, grads)
    m_scale, v_scale = 1 / (1 - ADAM_B1 ** t), 1 / (1 - ADAM_B2 ** t)
    params = jax.tree.map(lambda p, m, v: p - lr * m * m_scale / (jnp.sqrt(v * v_scale) + ADAM_EPS), params, m, v)
    return params, (m, v)


class TrainState(NamedTuple):
    """What changes from one training step to the next."""
    model: Model
    velocity: Any  # SGD: the running sum of past gradients. Adam: its two running means (m, v).
    step: Any      # the number of steps taken so far


def start_training(model: Model, hyper: Hyper) -> TrainState:
    """Step 0: the model, and the optimiser's memory of past gradients, all zeros."""
    zeros = jax.tree.map(jnp.zeros_like, model.params)
    return TrainState(model, (zeros, zeros) if hyper.optimizer == "adam" else zeros, jnp.zeros((), jnp.int32))


@partial(jax.jit, static_argnames="hyper")
def update(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array, hyper: Hyper):
    """One step of gradient descent on one batch. Returns (new state, loss, number of correct predictions).

        g <- dLoss/dparam + weight_decay * param     (the L2 penalty's gradient)
        SGD with momentum:  v <- momentum * v + g;   param <- param - lr * v
        (momentum 0: plain SGD, param <- param - lr * g;  --optimizer adam: see `adam`)
    """
    model = state.model
    by_hand = hyper.grad == "manual"
    if hyper.part and len(images) > hyper.part and len(images) % hyper.part == 0:
        value, (log_probs, caches), grads = gradients_in_parts(model, images, labels, key, by_hand, hyper.part)
    else:
        value, (log_probs, caches), grads = gradients(model, images, labels, key, by_hand)
    if hyper.weight_decay:
        grads = jax.tree.map(lambda g, p: g + hyper.weight_decay * p, grads, model.params)
    lr = learning_rate(hyper, state.step)
    if hyper.optimizer == "adam":
        params, velocity = adam(model.params, grads, state.velocity, lr, state.step + 1)
    elif hyper.momentum:
        velocity = jax.tree.map(lambda v, g: hyper.momentum * v + g, state.velocity, grads)
        params = jax.tree.map(lambda p, v: p - lr * v, model.params, velocity)
    else:
        params, velocity = jax.tree.map(lambda p, g: p - lr * g, model.params, grads), state.velocity
    stats = model.net.running.update(model.stats, caches)  # batch norm's running averages
    correct = (log_probs.argmax(axis=1) == labels).sum()
    return TrainState(Model(model.net, params, stats), velocity, state.step + 1), value, correct


def as_inputs(images):
    """Bytes (N, 28, 28) -> float32 rows (N, 784) in [0, 1]: what the network reads. (Training keeps its
    images as bytes and converts each batch as it is used: a quarter of the memory.)"""
    return images.reshape(len(images), 784).astype(np.float32) * np.float32(1 / 255)


def train_epoch(state: TrainState, images, labels, order, key, hyper: Hyper, batch_size: int,
                augment: Callable | None = None, progress: Callable | None = None):
    """One pass over the training set in minibatches, as a single compiled loop: `lax.scan` runs the steps
    inside XLA, with no Python per step. `order` is a shuffle of the images; the last
    len(images) % batch_size of it sit this epoch out. `key` draws dropout masks, and the random changes
    of `augment(key, images)` if given. `progress(steps_done, steps)` is called on the host every tenth
    of the epoch, without waiting for it.
    Returns (state, mean loss, accuracy on the batches seen)."""
    steps = len(order) // batch_size
    batches = order[:steps * batch_size].reshape(steps, batch_size)

    def step(state, batch_key_n):
        batch, key, n = batch_key_n
        dropout_key, augment_key = jax.random.split(key)
        if progress:
            every = max(1, steps // 10)
            jax.lax.cond((n + 1) % every == 0, lambda: jax.debug.callback(progress, n + 1, steps, ordered=False),
                         lambda: None)
        x = as_inputs(images[batch])
        if augment:
            x = augment(augment_key, x.reshape(-1, 28, 28)).reshape(-1, 784)
        state, value, correct = update(state, x, labels[batch], dropout_key, hyper)
        return state, (value, correct)

    state, (losses, correct) = jax.lax.scan(step, state, (batches, jax.random.split(key, steps), jnp.arange(steps)))
    return state, losses.mean(), correct.sum() / (steps * batch_size)


def evaluate(model: Model, images, labels, chunk: int = 100):
    """(loss, accuracy, predicted digits) on all `images` (bytes), `chunk` images at a time to bound memory.

    Why 100: a chunk's activations then stay in the CPU's caches. On the full test set this took the
    CNN's evaluation from 2.1 to 1.3 s and cnn-small's from 1.2 to 0.6 s (the MLP's: 0.13 -> 0.12 s)."""
    n = len(images)
    chunks = jnp.pad(images, ((0, -n % chunk), (0, 0), (0, 0))).reshape(-1, chunk, 28, 28)
    log_probs = jax.lax.map(lambda x: predict(model, as_inputs(x)), chunks).reshape(-1, 10)[:n]
    predicted = log_probs.argmax(axis=1)
    return nll(log_probs, labels), (predicted == labels).mean(), predicted


# XLA:CPU option: update the weights in place (5% off a large MLP's epoch; README, Speed).
CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def compile_function(fn, *example_args):
    """`fn` compiled ahead of time for arguments shaped like `example_args`."""
    lowered = jax.jit(fn).lower(*example_args)
    if jax.default_backend() == "cpu":
        try:
            return lowered.compile(CPU_COMPILER_OPTIONS)
        except (TypeError, RuntimeError):  # a jax or XLA that does not know the option: compile as usual
            pass
    return lowered.compile()


class Dataset(NamedTuple):
    train_images: np.ndarray  # (N, 28, 28) bytes: 0 = background, 255 = ink
    train_labels: np.ndarray  # (N,) digits 0-9
    test_images: np.ndarray
    test_labels: np.ndarray


class UserError(Exception):
    """Something the user can fix (a flag, a file, a photo): the command line prints it, no traceback."""


class Diverged(UserError):
    """The loss became NaN or infinite."""


def check_batch_size(batch_size: int, n: int) -> None:
    """A batch must fit in the n training images: UserError if not."""
    if batch_size > n:
        raise UserError(f"--batch-size {batch_size} is larger than the training set ({n:,} images); "
                        f"choose at most {n:,}.")


def describe(model: Model) -> str:
    """The layer sizes, read from the weights: e.g. 784-512-512-10, or conv32-conv64-128-10."""
    sizes = ["784"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        name = jax.tree_util.keystr(path[-1:])
        if name == "['W']":
            sizes.append(str(leaf.shape[0]))
        elif name == "['K']":
            sizes[-1:] = [] if sizes == ["784"] else sizes[-1:]
            sizes.append(f"conv{leaf.shape[1]}")
    return "-".join(sizes)


def param_count(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


class Progress:
    """A line that updates within an epoch longer than 5 s, on a terminal: steps done and images/s."""
    def __init__(self, batch_size: int, stream=None):
        self.batch_size, self.started, self.shown = batch_size, time.perf_counter(), False
        self.stream = stream or sys.stderr

    def __call__(self, done, steps):
        seconds = time.perf_counter() - self.started
        if seconds > 5 and self.stream.isatty():
            self.stream.write(f"\r  step {int(done):,} of {int(steps):,}, "
                              f"{int(done) * self.batch_size / seconds:,.0f} images/s ")
            self.stream.flush()
            self.shown = True

    def clear(self):
        if self.shown:
            self.stream.write("\r" + " " * 50 + "\r")
            self.shown = False


@dataclass
class Run:
    """What training has produced so far."""
    model: Model
    epochs: list = field(default_factory=list)     # one record per finished epoch
    predicted: np.ndarray | None = None            # the predicted digit of every test image, last epoch
    learning_rates: np.ndarray | None = None       # the learning rate of every step
    seconds: dict = field(default_factory=dict)    # where the time went: setup, compile, train, evaluate


def train(net: Layer, data: Dataset, hyper: Hyper, epochs: int, batch_size: int, seed: int = 0,
          augment: Callable | None = None, on_epoch: Callable[[Run], Any] | None = None,
          log: Callable[[str], Any] = print) -> Run:
    """Train `net` on `data` with minibatch SGD (or Adam), testing on all test images after every epoch.

    Args:
      net: the layers, e.g. build_net("mlp").
      data: training and test images.
      hyper: the step's settings (its total_steps is filled in here).
      epochs, batch_size: passes over the training set, and images per step.
      seed: the same seed gives the same numbers.
      augment: a function (key, images) -> images that changes each training batch at random.
      on_epoch: called with the Run after every epoch (the command line saves a checkpoint there).
      log: where the progress lines go. (The line that updates within a long epoch goes to sys.stderr,
        and only if it is a terminal when train is called.)
    Raises:
      Diverged: the loss became NaN or infinite; the Run keeps the last finite parameters.
      UserError: a batch larger than the training set.
    """
    setting_up = time.perf_counter()  # the first parameters, the optimiser's state, the data on the device
    n = len(data.train_images)
    check_batch_size(batch_size, n)
    steps = n // batch_size
    hyper = hyper._replace(total_steps=steps * epochs)
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    shuffler = np.random.default_rng(seed)  # a new order of the training images every epoch
    state = start_training(init_params(init_key, net), hyper)
    train_x, train_y = jnp.asarray(data.train_images), jnp.asarray(data.train_labels, jnp.int32)
    test_x, test_y = jnp.asarray(data.test_images), jnp.asarray(data.test_labels, jnp.int32)
    run = Run(state.model, learning_rates=np.asarray(learning_rate(hyper, np.arange(hyper.total_steps))))

    # Compile before the clock starts, so that epoch times are steady state.
    jax.block_until_ready((state, train_x, test_x))  # (the setup ends here, not while compiling)
    started = time.perf_counter()
    order = jnp.arange(n, dtype=jnp.int32)  # an example: only its shape and type matter here
    # The progress line shows only on a terminal; elsewhere (a log file, a pipe) the epoch is compiled
    # without it. Why: JAX never keeps a compiled function that calls back into Python in its compilation
    # cache, and from the cache the fastest recipe's epoch loads in 0.1 s instead of compiling in 1.3 s.
    progress = Progress(batch_size) if getattr(sys.stderr, "isatty", lambda: False)() else None
    epoch_fn = compile_function(partial(train_epoch, hyper=hyper, batch_size=batch_size, augment=augment,
                                        progress=progress), state, train_x, train_y, order, dropout_key)
    eval_fn = compile_function(evaluate, state.model, test_x, test_y)
    run.seconds = {"setup": started - setting_up, "compile": time.perf_counter() - started, "train": 0.0,
                   "evaluate": 0.0}
    log(f"{describe(state.model)}: {param_count(state.model.params):,} parameters; {n:,} training and "
        f"{len(test_x):,} test images; {jax.default_backend()}; compiled in {run.seconds['compile']:.1f} s")

    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        if progress is not None:
            progress.started = started
        # The shuffle is drawn on the host: NumPy does it in well under a millisecond.
        order = jnp.asarray(shuffler.permutation(n).astype(np.int32))
        new_state, train_loss, train_acc = epoch_fn(state, train_x, train_y, order,
                                                    jax.random.fold_in(dropout_key, epoch))
        train_loss, train_acc = float(train_loss), float(train_acc)  # the host waits here, once an epoch
        seconds = time.perf_counter() - started
        if progress is not None:
            progress.clear()
        run.seconds["train"] += seconds
        if not math.isfinite(train_loss):
            raise Diverged(f"training diverged in epoch {epoch}: the loss became {train_loss} at learning rate "
                           f"--lr {hyper.lr:g}. Try a smaller learning rate, e.g. --lr {hyper.lr / 10:g}.")
        state = new_state
        started = time.perf_counter()
        test_loss, test_acc, predicted = eval_fn(state.model, test_x, test_y)
        run.predicted = np.asarray(predicted)
        run.seconds["evaluate"] += time.perf_counter() - started
        run.model = state.model
        run.epochs.append({"epoch": epoch, "seconds": round(seconds, 3), "train_loss": train_loss,
                           "train_accuracy": train_acc, "test_loss": float(test_loss),
                           "test_accuracy": float(test_acc)})
        log(f"epoch {epoch:3d}  train loss {train_loss:.4f}  train acc {train_acc:.4f}  test acc "
            f"{float(test_acc):.4f}  {seconds:6.2f} s  {steps * batch_size / seconds:,.0f} samples/s")
        if on_epoch:
            on_epoch(run)
    return run


# =============================================================================
# 2. More layers, each with its backward pass; the networks
# =============================================================================

def Tanh() -> Layer:
    """y = tanh(x), an S-shaped bend from -1 to 1."""
    def forward(params, x, ctx):
        y = jnp.tanh(x)
        return y, y

    def backward(params, y, dy):
        """dy/dx = 1 - tanh(x)^2 = 1 - y^2."""
        return {}, dy * (1 - y * y)

    return Layer(no_params, forward, backward)


BN_EPS = 1e-5        # added to the variance so that we never divide by zero
BN_AVERAGING = 0.9   # running statistic <- 0.9 * running + 0.1 * this batch's


def BatchNorm() -> Layer:
    """Normalise each feature (the last axis) to mean 0 and variance 1, then scale by gamma and shift by beta.

    Training uses this batch's mean and variance and keeps running averages of them; evaluation uses
    the averages, so that a prediction never depends on which other images share its batch.
    """
    def init(key, in_shape):
        n = in_shape[-1]
        return {"gamma": jnp.ones(n, jnp.float32), "beta": jnp.zeros(n, jnp.float32)}, in_shape

    def forward(params, x, ctx):
        axes = tuple(range(x.ndim - 1))
        mean, var = (x.mean(axes), x.var(axes)) if ctx.train else (ctx.stats["mean"], ctx.stats["var"])
        inv_std = jax.lax.rsqrt(var + BN_EPS)
        x_hat = (x - mean) * inv_std
        return params["gamma"] * x_hat + params["beta"], (x_hat, inv_std, mean, var)

    def backward(params, cache, dy):
        """y = gamma * x_hat + beta with x_hat = (x - mean) / sqrt(var + eps), mean and var over the batch:
        dL/dgamma = sum(dy * x_hat),  dL/dbeta = sum(dy),
        dL/dx = gamma / sqrt(var + eps) * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
        the last two terms because every example moves the batch's mean and variance."""
        x_hat, inv_std, _, _ = cache
        axes = tuple(range(dy.ndim - 1))
        g = dy * params["gamma"]
        dx = inv_std * (g - g.mean(axes) - x_hat * (g * x_hat).mean(axes))
        return {"gamma": (dy * x_hat).sum(axes), "beta": dy.sum(axes)}, dx

    def start(params):
        return {"mean": jnp.zeros_like(params["beta"]), "var": jnp.ones_like(params["gamma"])}

    def update(stats, cache):
        _, _, mean, var = cache
        return {"mean": BN_AVERAGING * stats["mean"] + (1 - BN_AVERAGING) * mean,
                "var": BN_AVERAGING * stats["var"] + (1 - BN_AVERAGING) * var}

    return Layer(init, forward, backward, Running(start, update))


def Dropout(rate: float) -> Layer:
    """While training, zero each unit with probability `rate` and scale the rest by 1/(1 - rate), so that
    the expected value is unchanged; at evaluation, pass everything through."""
    def forward(params, x, ctx):
        if not ctx.train:
            return x, None
        keep = jax.random.bernoulli(ctx.key, 1 - rate, x.shape)
        return jnp.where(keep, x / (1 - rate), 0.0), keep

    def backward(params, keep, dy):
        """y = x * keep / (1 - rate)  =>  dL/dx = dy * keep / (1 - rate)."""
        return {}, jnp.where(keep, dy / (1 - rate), 0.0)

    return Layer(no_params, forward, backward)


def Residual(*layers: Layer) -> Layer:
    """y = x + f(x), f being `layers` in series: the skip lets the signal (and the gradient) bypass f."""
    f = serial(*layers)

    def init(key, in_shape):
        params, out_shape = f.init(key, in_shape)
        if out_shape != in_shape:
            raise ValueError(f"a residual block must keep its shape, but it maps {in_shape} to {out_shape}")
        return params, in_shape

    def forward(params, x, ctx):
        fx, caches = f.forward(params, x, ctx)
        return x + fx, caches

    def backward(params, caches, dy):
        """dL/dx = dy + (df/dx)^T dy: the gradient flows through both paths and adds up."""
        grads, dx = f.backward(params, caches, dy)
        return grads, dy + dx

    return Layer(init, forward, backward, f.running)


def Reshape(shape: tuple) -> Layer:
    """Each example reshaped, e.g. 784 pixels -> (28, 28, 1) for a convolution, or back to one row (-1,)."""
    def init(key, in_shape):
        return {}, np.empty(in_shape).reshape(shape).shape

    def forward(params, x, ctx):
        return x.reshape((len(x),) + tuple(shape)), x.shape

    def backward(params, in_shape, dy):
        """Reshaping moves no numbers, so the gradient is reshaped back."""
        return {}, dy.reshape(in_shape)

    return Layer(init, forward, backward)


def patches(x, k: int):
    """(B, H, W, C) -> (B, H-k+1, W-k+1, k*k*C): each output pixel's k x k input window as one row.

    With the windows as rows, a convolution is one matrix multiply, which runs far faster on a CPU
    than lax.conv_general_dilated does here."""
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    return jnp.concatenate([x[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)


def unpatches(dcols, in_shape: tuple, k: int):
    """The way back from `patches`: each input pixel collects the gradient of every window it sat in,
    as the k*k shifted copies of dcols added up."""
    b, h, w, c = in_shape
    ho, wo = dcols.shape[1], dcols.shape[2]
    parts = dcols.reshape(b, ho, wo, k * k, c)
    return sum(jnp.pad(parts[:, :, :, i * k + j], ((0, 0), (i, h - ho - i), (j, w - wo - j), (0, 0)))
               for i in range(k) for j in range(k))


def Conv(filters: int, k: int = 3) -> Layer:
    """A convolution: the same small dense layer (k x k pixels x channels -> `filters`) applied at every
    position of the image; no padding ("valid"), stride 1."""
    # jax.grad would differentiate the k*k slices of `patches` one by one, each into a full-size
    # array; this tells it to use `unpatches` instead, the backward pass we write anyway (1.35x faster).
    windows = jax.custom_vjp(lambda x: patches(x, k))
    windows.defvjp(lambda x: (patches(x, k), x.shape), lambda shape, dcols: (unpatches(dcols, shape, k),))

    def init(key, in_shape):
        h, w, c = in_shape
        fan_in = k * k * c
        K = jax.random.normal(key, (fan_in, filters), jnp.float32) / np.sqrt(fan_in)
        return {"K": K, "b": jnp.zeros(filters, jnp.float32)}, (h - k + 1, w - k + 1, filters)

    def forward(params, x, ctx):
        cols = windows(x)
        b, h, w, n = cols.shape
        # All positions of all images as the rows of one 2-D matrix: jax.grad then takes dL/dK as one plain
        # matrix multiply too (from a 4-D `cols @ K` it contracted three axes at once: 1.14x slower per step).
        y = cols.reshape(-1, n) @ params["K"] + params["b"]
        return y.reshape(b, h, w, filters), (cols, x.shape)

    def backward(params, cache, dy):
        """y[b,i,j] = patch[b,i,j] . K + b, a dense layer at every position, so
        dL/dK = sum over positions of patch^T dy,  dL/db = sum of dy,  and each input pixel
        collects dy K^T from every window it was part of (`unpatches`)."""
        cols, in_shape = cache
        rows = dy.reshape(-1, filters)  # one row per position, as in forward
        dcols = (rows @ params["K"].T).reshape(cols.shape)
        return {"K": cols.reshape(len(rows), -1).T @ rows, "b": rows.sum(0)}, unpatches(dcols, in_shape, k)

    return Layer(init, forward, backward)


def _blocks(x):
    """(B, H, W, C) -> (B, H/2, 2, W/2, 2, C): each 2x2 block on axes 2 and 4 (an odd last row or column dropped)."""
    b, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


def pool_winners(x):
    """The 2x2 max-pool of x, and a mask of where each block's maximum was (only the first, on a tie)."""
    blocks = _blocks(x)
    y = blocks.max(axis=(2, 4))
    # The first of a block's four inputs (a b / c d) that equals its maximum wins. Written as comparisons, not
    # a running count, so that the compiler fuses them into the backward pass (a count cost ~3% of a CNN step).
    a, b, c = blocks[:, :, 0, :, 0], blocks[:, :, 0, :, 1], blocks[:, :, 1, :, 0]
    a_wins = a == y
    b_wins = (b == y) & ~a_wins
    c_wins = (c == y) & ~(a_wins | b_wins)
    d_wins = ~(a_wins | b_wins | c_wins)  # d is the maximum when none of a, b, c is
    top, bottom = jnp.stack([a_wins, b_wins], axis=3), jnp.stack([c_wins, d_wins], axis=3)
    return y, jnp.stack([top, bottom], axis=2)


def unpool(winners, dy, in_shape: tuple):
    """The way back from the max-pool: each block's gradient goes to the input that won, 0 to the others."""
    b, h, w, c = in_shape
    dx = jnp.where(winners, dy[:, :, None, :, None, :], 0.0).reshape(b, h // 2 * 2, w // 2 * 2, c)
    return jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


def MaxPool() -> Layer:
    """The largest value of each 2x2 block (an odd last row or column is dropped): half the width and height."""
    # As for Conv: jax.grad of a max compares every input with it again; `unpool` routes dy in one pass.
    pool = jax.custom_vjp(lambda x: pool_winners(x)[0])
    pool.defvjp(lambda x: (lambda y, winners: (y, (winners, x.shape)))(*pool_winners(x)),
                lambda res, dy: (unpool(res[0], dy, res[1]),))

    def init(key, in_shape):
        h, w, c = in_shape
        return {}, (h // 2, w // 2, c)

    def forward(params, x, ctx):
        return pool(x), (pool_winners(x)[1], x.shape)

    def backward(params, cache, dy):
        """y = max of a block  =>  dy/dx = 1 for the largest of its four inputs, 0 for the others. The winner
        is remembered from the forward pass: comparing the inputs with the maximum again is fragile in
        float32, where the compiler may recompute them with different rounding."""
        winners, in_shape = cache
        return {}, unpool(winners, dy, in_shape)

    return Layer(init, forward, backward)


def gradients_in_parts(model: Model, images, labels, key, by_hand: bool, part: int):
    """What `gradients` gives for the whole batch, computed `part` images at a time.

    Why: a CNN's activations for a batch of 128 (its patches alone are 18 MB) do not fit in a CPU's
    caches, and those of 32 images do; taken 32 at a time, `--model cnn`'s epoch takes 0.8x the time.
    The batch's loss is the mean of its parts' mean losses, so its gradient is the mean of theirs.
    Batch norm is never split (its statistics are the whole batch's), so no layer keeps running
    statistics here and no caches are passed on. `part` divides the batch.
    """
    n = len(images) // part
    parts = (images.reshape(n, part, -1), labels.reshape(n, part), jax.random.split(key, n))

    def add_part(total, part_data):
        value, (log_probs, _), grads = gradients(model, *part_data, by_hand=by_hand)
        return jax.tree.map(jnp.add, total, grads), (value, log_probs)

    zeros = jax.tree.map(jnp.zeros_like, model.params)
    grads, (values, log_probs) = jax.lax.scan(add_part, zeros, parts)
    return values.mean(), (log_probs.reshape(-1, 10), [None] * len(model.stats)), jax.tree.map(lambda g: g / n, grads)


CNN_PART = 32  # images per forward and backward pass of a CNN on a CPU (16 was as fast, 64 slower, 8 slower still)


def step_part(model: str, batchnorm: bool) -> int:
    """Hyper.part for a run: CNN_PART for a CNN on a CPU, else 0 (the whole batch at once). A GPU wants
    large batches, an MLP's activations are small, and batch norm needs the whole batch."""
    return CNN_PART if model.startswith("cnn") and not batchnorm and jax.default_backend() == "cpu" else 0


MODELS = ("mlp", "resmlp", "cnn", "cnn-small")


def build_net(model: str = "mlp", hidden: tuple = (512, 512), activation: str = "relu", batchnorm: bool = False,
              dropout: float = 0.2) -> Layer:
    """The network a command line describes: 784 pixels in, 10 scores out.

    mlp:       Dense(h), [BatchNorm], activation, [Dropout] for each h in `hidden`, then Dense(10).
    resmlp:    the first hidden layer, then each further one as a Residual block (all sizes equal).
    cnn:       28x28x1 -> Conv 32 -> 26x26x32 -> pool -> 13x13x32 -> Conv 64 -> 11x11x64 -> pool -> 5x5x64
               -> Dense 128 -> Dense 10 (ReLU after each but the last).
    cnn-small: 28x28x1 -> Conv 16 -> pool -> 13x13x16 -> Conv 32 -> pool -> 5x5x32 -> Dense 64 -> Dense 10:
               a fifth of the cnn's work per image (README: the fastest to 99%).
    """
    def then(layer, norm=batchnorm, bend=Tanh if activation == "tanh" else Relu, pool=False, drop=dropout):
        """A dense or conv layer and what may follow it, in the usual order."""
        return [layer] + [BatchNorm()] * norm + [bend()] + [MaxPool()] * pool + [Dropout(drop)] * (drop > 0)

    if model in ("mlp", "resmlp"):
        if model == "resmlp" and len(set(hidden)) > 1:
            raise UserError(f"--model resmlp adds each block's input to its output, so every hidden layer needs the "
                            f"same size; got --hidden {','.join(map(str, hidden))}. Try --hidden 256,256,256.")
        layers = then(Dense(hidden[0]))
        for size in hidden[1:]:
            layers += [Residual(*then(Dense(size)))] if model == "resmlp" else then(Dense(size))
        return serial(*layers, Dense(10))
    conv = lambda filters: then(Conv(filters), bend=Relu, pool=True, drop=0)
    dense = lambda size: then(Dense(size), norm=False, bend=Relu)
    if model == "cnn-small":
        return serial(Reshape((28, 28, 1)), *conv(16), *conv(32), Reshape((-1,)), *dense(64), Dense(10))
    if model == "cnn":
        return serial(Reshape((28, 28, 1)), *conv(32), *conv(64), Reshape((-1,)), *dense(128), Dense(10))
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")


# Data augmentation: random changes of each training image, in JAX.
# Ranges of the random changes, each drawn uniformly and independently per image.
MAX_SHIFT = 2.5                 # pixels, up/down and left/right (a 28x28 digit sits in a 20x20 box)
MAX_ROTATION = np.radians(15)   # radians, either way
MIN_SCALE, MAX_SCALE = 0.85, 1.15  # height and width each, so the aspect ratio changes too
MAX_SHEAR = 0.2                 # horizontal pixels moved per pixel of height (a slant of ~11 degrees)
MAX_THICKEN, MAX_THIN = 1.0, 0.4  # weight of the 3x3 dilation (thicker pen) / erosion (thinner pen)
HOLES, HOLE_RADIUS, HOLE_CHANCE = 2, 1.6, 0.5  # gaps in the strokes: up to 2 discs of 1.6 px, each half the time
MAX_BEND, BEND_POINTS = 2.0, 4  # elastic bend: a 4x4 grid of points, each moved up to 2 px each way


def _neighbourhood(x, reduce):
    """The max (dilation) or min (erosion) over each pixel's 3x3 neighbourhood, (B, 28, 28) -> same.

    Nine shifted copies of the image, padded with the background (0) at the edges."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1)))
    h, w = x.shape[1:]
    return reduce(jnp.stack([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]), axis=0)


def change_thickness(x, amount):
    """Thicker strokes for amount > 0, thinner for amount < 0 (amount per image, in [-1, 1]).

    Blends the image with its dilation (ink spreads one pixel) or its erosion (a pixel of
    ink peels off each edge). A partial blend gives a partial pixel of thickness."""
    amount = amount[:, None, None]
    thicker = _neighbourhood(x, jnp.max)
    thinner = _neighbourhood(x, jnp.min)
    return jnp.where(amount > 0, x + amount * (thicker - x), x - amount * (thinner - x))


def _bilinear(image, rows, cols):
    """Read `image` (28, 28) at real-valued pixel positions: each value is the
    distance-weighted mix of the 4 pixels around it; positions outside read 0 (background)."""
    return jax.scipy.ndimage.map_coordinates(image, [rows, cols], order=1, mode="constant", cval=0.0)


def punch_holes(key, x):
    """Gaps in the strokes: each of HOLES discs (HOLE_RADIUS px, at a random place of the digit's 20x20
    box) is cut out of the ink with chance HOLE_CHANCE, (B, 28, 28) -> same.

    A photo's thin pen fades, and taking out a ruled line takes a bite out of the digit across it: a
    network that has seen broken strokes reads a 0 with a gap as a 0 rather than a 6."""
    where_key, which_key = jax.random.split(key)
    centres = jax.random.uniform(where_key, (len(x), HOLES, 2), minval=4.0, maxval=24.0)
    cut = jax.random.uniform(which_key, (len(x), HOLES)) < HOLE_CHANCE
    rows, cols = jnp.meshgrid(jnp.arange(28.0), jnp.arange(28.0), indexing="ij")
    distance = jnp.hypot(rows - centres[..., 0, None, None], cols - centres[..., 1, None, None])
    hole = jnp.clip(HOLE_RADIUS + 0.5 - distance, 0.0, 1.0) * cut[..., None, None]  # anti-aliased edge
    return x * (1 - hole.max(axis=1))


def smooth_bend(key, b):
    """A random, smooth bend of each of b images: (B, 2, 28, 28), how far (down, right) in pixels each
    pixel reads from, elsewhere in the image.

    One hand writes a loop rounder or a stroke longer than another; no shift, turn or shear does that.
    An elastic distortion (Simard, Steinkraus and Platt, 2003, for MNIST) does: every point moves a
    little, and nearby points move alike. Here each point of a coarse BEND_POINTS x BEND_POINTS grid
    over the image gets a random move of up to MAX_BEND px each way, and the pixels between them move
    by the linear blend of their grid points' moves."""
    moves = jax.random.uniform(key, (b, 2, BEND_POINTS, BEND_POINTS), minval=-MAX_BEND, maxval=MAX_BEND)
    # blend[i, k]: how much pixel row (or column) i takes from grid point k; each row sums to 1
    where = np.linspace(0, BEND_POINTS - 1, 28)
    blend = jnp.asarray(np.maximum(0, 1 - np.abs(where[:, None] - np.arange(BEND_POINTS))), jnp.float32)
    return jnp.einsum("ik,bdkl,jl->bdij", blend, moves, blend)


def affine(x, shift, angle, scale, shear, bend=0.0):
    """Move, rotate, scale and shear each image about its centre, and bend it.

    Per image: shift (B, 2) in pixels (down, right), angle (B,) in radians, scale (B, 2)
    (height, width) as factors, shear (B,) in pixels sideways per pixel down, and bend
    (B, 2, 28, 28) from smooth_bend (or 0: none).

    We go backwards: for every output pixel we compute where it comes from in the
    input, and read the input there with bilinear interpolation. Going from the output
    means every output pixel gets exactly one value, with no holes."""
    centre = (28 - 1) / 2  # 13.5: the middle of the 28x28 grid, between pixels 13 and 14
    rows, cols = jnp.meshgrid(jnp.arange(28.0), jnp.arange(28.0), indexing="ij")
    # Output pixel positions relative to the centre, less the shift: (B, 28, 28) each.
    y = rows - centre - shift[:, 0, None, None]
    x_ = cols - centre - shift[:, 1, None, None]
    # Undo the forward transform  output = R(angle) . Shear . (scale * input):
    # first rotate back by -angle, then unshear, then divide by the scale.
    c, s = jnp.cos(angle)[:, None, None], jnp.sin(angle)[:, None, None]
    y, x_ = c * y + s * x_, -s * y + c * x_
    x_ = x_ - shear[:, None, None] * y  # shear: each row slides sideways in proportion to its height
    y, x_ = y / scale[:, 0, None, None], x_ / scale[:, 1, None, None]
    bend = jnp.broadcast_to(bend, (len(x), 2, 28, 28))  # then bent: each pixel reads a little way off
    return jax.vmap(_bilinear)(x, y + centre + bend[:, 0], x_ + centre + bend[:, 1])


def augment_images(key, x):
    """A random variant of each image, (B, 28, 28) floats in [0, 1] -> the same: what --augment trains on.

    Each image gets its own small change of the kind that separates one person's handwriting from
    another's, or a photo from a scan: where the digit sits, its slant, size and shear, the shape of its
    strokes, how thick the pen was, and gaps where a stroke faded. Reproducible from the key; pure JAX,
    so it runs inside the compiled epoch."""
    b = len(x)
    k_shift, k_angle, k_scale, k_shear, k_thick, k_holes, k_bend = jax.random.split(key, 7)
    shift = jax.random.uniform(k_shift, (b, 2), minval=-MAX_SHIFT, maxval=MAX_SHIFT)
    angle = jax.random.uniform(k_angle, (b,), minval=-MAX_ROTATION, maxval=MAX_ROTATION)
    scale = jax.random.uniform(k_scale, (b, 2), minval=MIN_SCALE, maxval=MAX_SCALE)  # (height, width)
    shear = jax.random.uniform(k_shear, (b,), minval=-MAX_SHEAR, maxval=MAX_SHEAR)
    thickness = jax.random.uniform(k_thick, (b,), minval=-MAX_THIN, maxval=MAX_THICKEN)
    x = punch_holes(k_holes, change_thickness(x, thickness))  # the pen first, on the sharp original ...
    x = affine(x, shift, angle, scale, shear, smooth_bend(k_bend, b))  # ... then the page moves under it
    return jnp.clip(x, 0.0, 1.0)


# =============================================================================
# 3. Data: download, verify, parse
# =============================================================================
# MNIST is four gzip files in the IDX format: a header (two zero bytes, the
# element type, the number of dimensions, the size of each) and then the values.
# Downloads are checked against the published size and MD5 before they are
# renamed into place; local files are read with bounded memory and recognised
# as the published data by the MD5 of their content.

class DataError(UserError):
    """An MNIST file that is missing, damaged or not MNIST; the message names it and says what to do."""


MNIST_FILES = {  # name: (size in bytes, MD5) of the published .gz files, and the MD5 of their content
    "train-images-idx3-ubyte.gz": (9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte.gz": (28881, "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte.gz": (1648877, "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte.gz": (4542, "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
}
# Tried in order. The original host, yann.lecun.com, answers 403/404 now.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
DOWNLOAD_TIMEOUT = 30          # seconds without a byte before a mirror counts as down
DOWNLOAD_MIN_SECONDS = 60      # every file gets at least this long in all ...
DOWNLOAD_MIN_RATE = 20_000     # ... and more for a large one: its size at 20 kB/s


def mirrors() -> list[str]:
    """The base URLs to try: MNIST_MIRRORS (comma separated) if set, else MIRRORS."""
    urls = [u.strip() for u in os.environ.get("MNIST_MIRRORS", "").split(",") if u.strip()] or list(MIRRORS)
    return [u if u.endswith("/") else u + "/" for u in urls]


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip()[:1] == b"<"


class _Refused(Exception):
    """Why one mirror's answer was not the published file (the download moves on to the next mirror)."""


def _fetch(url: str, out, size: int, md5: str, timeout: float, log: Callable[[str], Any]) -> None:
    """Stream `url` into the open file `out`, refusing anything but the published `size` bytes with `md5`,
    within a deadline that grows with the size; log progress about every 2 s."""
    deadline = max(DOWNLOAD_MIN_SECONDS, size / DOWNLOAD_MIN_RATE)
    started = last_shown = time.monotonic()
    digest, got = hashlib.md5(), 0
    with urllib.request.urlopen(url, timeout=timeout) as response:
        announced = response.headers.get("Content-Length")
        if announced and announced.isdigit() and int(announced) > size:
            raise _Refused(f"it announces {int(announced):,} bytes, more than the published {size:,}")
        while chunk := response.read1(1 << 16):  # read1: whatever has arrived, so a slow drip still ends
            if got == 0 and _looks_like_html(chunk[:512]):
                raise _Refused("the server sent an HTML page, not a gzip file")
            got += len(chunk)
            if got > size:
                raise _Refused(f"it sent more than the published {size:,} bytes (stopped there)")
            digest.update(chunk)
            out.write(chunk)
            now = time.monotonic()
            if now - started > deadline:
                raise _Refused(f"too slow: {got:,} of {size:,} bytes after {now - started:.0f} s "
                               f"(each file gets {deadline:.0f} s)")
            if now - last_shown > 2:
                log(f"  {got / 1e6:.1f} of {size / 1e6:.1f} MB, {got / (now - started) / 1e6:.2f} MB/s")
                last_shown = now
    if got < size:
        raise _Refused(f"truncated: got {got:,} bytes, expected {size:,}")
    if digest.hexdigest() != md5:
        raise _Refused(f"MD5 {digest.hexdigest()} differs from the published {md5}")


def download(name: str, folder: Path, urls: list[str] | None = None, timeout: float = DOWNLOAD_TIMEOUT,
             log: Callable[[str], Any] = print) -> Path:
    """Fetch one MNIST file into `folder`, trying each mirror in turn.

    The body streams into a temporary file beside the target and is checked (size, MD5) before it is
    renamed into place, so a failed or partial download never leaves a file behind. A mirror that
    sends more than the published size, or drips too slowly, is dropped for the next one.

    Args:
      name: one of MNIST_FILES.
      folder: where the file goes (created if needed).
      urls: base URLs to try in order; default `mirrors()`.
      timeout: seconds to wait for any byte before giving up on a mirror.
    Raises:
      DataError: every mirror failed; the message lists each URL with its reason.
    """
    size, md5, _ = MNIST_FILES[name]
    target = Path(folder) / name
    failures = []
    for base in urls or mirrors():
        url = base + name
        try:
            write_atomically(target, lambda f: _fetch(url, f, size, md5, timeout, log))
            return target
        except _Refused as e:
            problem = str(e)
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code} {e.reason}"
        except (socket.timeout, TimeoutError):
            problem = f"no answer within {timeout:g} s (timed out)"
        except urllib.error.URLError as e:
            problem = f"could not connect ({e.reason})"
        except ValueError as e:  # e.g. a mirror written without http:// or https://
            problem = f"not a usable URL ({e})"
        except http.client.IncompleteRead as e:
            problem = f"the connection closed early, after {len(e.partial):,} bytes (truncated)"
        except (ConnectionError, http.client.HTTPException) as e:
            problem = f"the transfer failed ({e.__class__.__name__}: {e})"
        failures.append(f"  {url}: {problem}")
    raise DataError(
        f"could not download {name}; every mirror failed:\n" + "\n".join(failures) + "\n"
        f"Put the four MNIST files ({', '.join(MNIST_FILES)}) in {Path(folder).resolve()} by hand, "
        "or set MNIST_MIRRORS to a comma-separated list of base URLs you can reach, "
        "or point --data-dir (or MNIST_DATA_DIR) at a folder that has them.")


# The IDX element types. read_idx reads them all (it is a general IDX reader); MNIST uses unsigned bytes.
IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_MAX_BYTES = 1 << 28  # 256 MiB, five times MNIST's largest file: a header that promises more is refused


class _Hashing(io.RawIOBase):
    """A read-only view of a binary stream that feeds every byte read to an MD5."""
    def __init__(self, stream):
        self.stream, self.md5 = stream, hashlib.md5()

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.stream.readinto(buffer)
        self.md5.update(memoryview(buffer)[:n])
        return n


def parse_idx(stream, name: str = "IDX data") -> np.ndarray:
    """Read an IDX array from a binary stream (already un-gzipped), with memory bounded by its header.

    Layout: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions n, n big-endian uint32 sizes, then the
    values, big-endian, row-major. The header is checked before any data is read, and reading stops
    as soon as the data runs past what it promises, so a gzip bomb costs no more than its header says.

    Raises:
      DataError: empty, not IDX, too large, truncated, or longer than its header says.
    """
    if isinstance(stream, (bytes, bytearray)):
        stream = io.BytesIO(stream)
    head = stream.read(4)
    if not head:
        raise DataError(f"{name} is empty (0 bytes). Delete it and run again to download a fresh copy.")
    if _looks_like_html(head):
        raise DataError(f"{name} is an HTML page (a web page saved under this name), not MNIST data. "
                        "Delete it and run again to download the real file.")
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in IDX_TYPES or head[3] == 0:
        raise DataError(f"{name} is not an IDX file: it starts with {head!r}, expected 00 00, a type code "
                        "and a number of dimensions. Replace it with the MNIST file of that name.")
    dtype, ndim = np.dtype(IDX_TYPES[head[2]]), head[3]
    sizes = stream.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DataError(f"{name} is truncated: it ends inside its own header.")
    shape = struct.unpack(f">{ndim}I", sizes)
    expected = math.prod(shape) * dtype.itemsize
    if expected > IDX_MAX_BYTES:
        raise DataError(f"{name} has a header that promises shape {shape}, {expected:,} bytes of data: more "
                        f"than the {IDX_MAX_BYTES:,} this reader accepts. It is not an MNIST file.")
    data = bytearray(expected)
    view, got = memoryview(data), 0
    while got < expected and (n := stream.readinto(view[got:got + (1 << 20)])):
        got += n
    if got < expected or stream.read(1):
        what = "truncated" if got < expected else "longer than its header says"
        raise DataError(f"{name} is {what}: its header promises shape {shape} ({expected:,} bytes of data)"
                        f"{f' but it holds {got:,}' if got < expected else ''}. Delete it and run again to "
                        "download a fresh copy.")
    return np.frombuffer(data, dtype).reshape(shape)


def read_idx(path: str | os.PathLike, with_md5: bool = False):
    """Read an IDX file, gzip-compressed or raw (see `parse_idx`); with_md5 also returns the MD5 of its
    uncompressed content, by which the published MNIST data is recognised however it was compressed."""
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = _Hashing(gzip.GzipFile(fileobj=raw) if compressed else raw)
        try:
            array = parse_idx(io.BufferedReader(stream, 1 << 16), str(path))
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path} is a damaged or truncated gzip file ({e}; {path.stat().st_size:,} bytes on "
                            "disk). Delete it and run again to download a fresh copy.") from None
    return (array, stream.md5.hexdigest()) if with_md5 else array


def _check_pair(images, images_path: Path, labels, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{images_path} holds {images.dtype} values of shape {images.shape}; "
                        "MNIST images are unsigned bytes of shape (N, 28, 28).")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{labels_path} holds {labels.dtype} values of shape {labels.shape}; "
                        "MNIST labels are unsigned bytes of shape (N,).")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images):,} images but {labels_path} has {len(labels):,} labels; "
                        "they must come in matching pairs.")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{labels_path} has a label {labels.max()} outside 0-9 "
                        f"(at index {int(np.argmax(labels > 9))}); it is not an MNIST label file.")
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images.")
    return images, labels


def load_mnist(data_dir: str | os.PathLike = "data", log: Callable[[str], Any] = print) -> Dataset:
    """Load MNIST from `data_dir`, downloading whichever of the four files is missing.

    Files already there (gzip or raw) are read first, with no network access, so a damaged one is
    reported before any download; files that are not the published data (your own IDX files, a
    subset) are used if they parse, with one line saying so. Nothing already in the folder is
    deleted or overwritten.

    Raises:
      DataError: a file is damaged or could not be downloaded; the message says what to do.
    """
    folder = Path(data_dir)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--data-dir {folder} is a file, not a folder; give the folder that holds (or will "
                        "hold) the four MNIST files.")
    paths = {name: next((p for p in (folder / name, folder / name.removesuffix(".gz")) if p.is_file()), None)
             for name in MNIST_FILES}
    arrays = {name: read_idx(path, with_md5=True) for name, path in paths.items() if path}
    for name in [name for name, path in paths.items() if path is None]:
        log(f"downloading {name} to {folder}/")
        folder.mkdir(parents=True, exist_ok=True)
        paths[name] = download(name, folder, log=log)
        arrays[name] = read_idx(paths[name], with_md5=True)
    for name, (_, md5) in arrays.items():
        if md5 != MNIST_FILES[name][2]:
            log(f"note: {paths[name]} is not the published file (its content differs); "
                "using it as your own IDX file since it parses")
    pair = lambda kind: _check_pair(arrays[f"{kind}-images-idx3-ubyte.gz"][0], paths[f"{kind}-images-idx3-ubyte.gz"],
                                    arrays[f"{kind}-labels-idx1-ubyte.gz"][0], paths[f"{kind}-labels-idx1-ubyte.gz"])
    return Dataset(*pair("train"), *pair("t10k"))


# =============================================================================
# 4. Files: atomic writes, run folders, checkpoints
# =============================================================================
# Every file is written to a temporary name beside its target and renamed into
# place, so a reader, a crash or Ctrl-C never sees half a file. Each training run
# gets a folder of its own (runs/mlp-1, runs/mlp-2, ...), so no run ever writes
# over another's files; runs/latest names the last run that finished an epoch.

def _usual_permissions(path: Path) -> None:
    """mkstemp makes files only their owner can read; give ours what the umask allows, like open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# What a file system says when it refuses a write (as opposed to a failed download inside `write`).
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
                      errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


def write_atomically(path: Path, write: Callable[[Any], Any], mode: str = "wb", exclusive: bool = False) -> None:
    """Call write(f) on a temporary file beside `path`, then rename it to `path`. With `exclusive`, never
    replace a file already there (FileExistsError instead). A file system that refuses (full, read-only)
    gets a UserError naming the file and what to do; nothing half-written is left under any name."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so that a power cut never leaves an empty file
        _usual_permissions(Path(tmp))
        if exclusive:
            os.link(tmp, path)  # fails if `path` exists: two runs can never both claim it
        else:
            os.replace(tmp, path)
    except OSError as e:
        if e.errno not in FILE_SYSTEM_ERRORS:
            raise
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        advice = (f"the disk holding {path.parent} is full: free some space there" if full else
                  f"check that {path.parent} exists and that you may write to it") + \
            " (or choose another folder) and run again"
        raise UserError(f"could not write {path}: {e.strerror or e}. Nothing was left half-written; {advice}.") \
            from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


RUNS = Path("runs")
LATEST = RUNS / "latest"


def claim_run_folder(config: dict, out: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """A folder of this run's own, claimed by writing its config.json there.

    Default: the next free runs/<model>-<N>. --name NAME: runs/NAME. --out DIR: exactly DIR. A named
    folder must be new or empty; a second run started at the same moment finds config.json taken.
    """
    def claim(folder: Path) -> None:
        write_atomically(folder / "config.json", lambda f: json.dump(config, f, indent=1), "w", exclusive=True)

    if out is not None and name is not None:
        raise UserError(f"give --name {name} or --out {out}, not both: --name makes runs/{name}, --out names "
                        "the folder itself.")
    if out is None and name is None:
        for n in range(1, 1_000_000):
            folder = RUNS / f"{config['model']}-{n}"
            try:
                folder.mkdir(parents=True)
                claim(folder)
                return folder
            except FileExistsError:  # another run's folder (perhaps created this very moment)
                continue
    folder = Path(out) if out is not None else RUNS / name
    flag = "--out" if out is not None else "--name"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder; give a new folder for this run's files.")
    folder.mkdir(parents=True, exist_ok=True)
    taken = sorted(p.name for p in folder.iterdir())
    if taken:
        raise UserError(f"{flag} {folder} already holds {', '.join(taken[:5])}{' ...' if len(taken) > 5 else ''}. "
                        f"Each run writes into a folder of its own: give a new or empty folder, or leave out "
                        f"{flag} to get the next runs/{config['model']}-N.")
    try:
        claim(folder)
    except FileExistsError:
        raise UserError(f"{flag} {folder} is in use by another run that started at the same time; "
                        "give another folder.") from None
    return folder


def point_latest_at(folder: Path) -> None:
    """Make runs/latest name `folder`: a link where the file system allows one, else a one-line text file."""
    if Path(folder).resolve().parent != RUNS.resolve():
        return  # a run written with --out elsewhere: runs/latest is for the runs in runs/
    tmp = RUNS / f".latest.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(Path(folder).name, tmp, target_is_directory=True)
        os.replace(tmp, LATEST)
    except OSError:  # no links here: a text file holding the folder's name
        tmp.unlink(missing_ok=True)
        write_atomically(LATEST, lambda f: f.write(Path(folder).name + "\n"), "w")


def latest_checkpoint() -> Path:
    """runs/latest's params.npz: the model of the last run that finished an epoch."""
    if LATEST.is_symlink() or LATEST.is_dir():
        return LATEST / "params.npz"
    if LATEST.is_file():
        return RUNS / LATEST.read_text().strip() / "params.npz"
    raise CheckpointError(f"no trained model yet: {LATEST} does not exist. Train one first with "
                          "`python mnist_jax.py` (it writes runs/mlp-1/), or give the path of a params.npz.")


class CheckpointError(UserError):
    """A params.npz that cannot be read back."""


CHECKPOINT_MARK = "mnist_jax checkpoint"    # how params.npz says what wrote it, then the format version
CHECKPOINT_FORMAT = f"{CHECKPOINT_MARK} 3"  # 3: layers as closures, keys like params[0]['W']; 2: tuples


def save_checkpoint(folder: Path, config: dict, model: Model) -> None:
    """folder/params.npz: the parameters, batch norm's statistics and the configuration (no pickles)."""
    arrays = {"format": np.array(CHECKPOINT_FORMAT), "config": np.array(json.dumps(config))}
    for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        arrays[jax.tree_util.keystr(path).lstrip(".")] = np.asarray(leaf)
    write_atomically(Path(folder) / "params.npz", lambda f: np.savez(f, **arrays))


def _read_npy(archive: zipfile.ZipFile, key: str, path: Path, shape=None, limit: int = 1 << 20) -> np.ndarray:
    """One array of an .npz, its declared size and header checked before any data is read: `shape` if
    given (float32), else any shape of at most `limit` bytes. Never unpickles."""
    try:
        info = archive.getinfo(key + ".npy")
    except KeyError:
        raise CheckpointError(f"{path} has no {key}: it is damaged or from another version of mnist_jax.") from None
    if shape is not None:
        limit = math.prod(shape) * 4
    if info.file_size > limit + 4096:  # 4096: room for the .npy header
        raise CheckpointError(f"{path}: {key} declares {info.file_size:,} bytes, but it should hold "
                              f"{'shape ' + str(shape) + ', ' if shape else ''}at most {limit:,}; the file is "
                              "damaged or was not written by mnist_jax.")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        got_shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise CheckpointError(f"{path} is not a readable .npz checkpoint: {key} holds pickled Python objects, "
                                  "which mnist_jax never loads (they could run any code).")
        if shape is not None and (got_shape != tuple(shape) or dtype != np.float32):
            raise CheckpointError(f"{path}: {key} has shape {got_shape} and type {dtype}, expected "
                                  f"{tuple(shape) if shape else 'plain values'}{' of float32' if shape else ''}.")
        nbytes = math.prod(got_shape) * dtype.itemsize
        if nbytes > limit:
            raise CheckpointError(f"{path}: {key} would take {nbytes:,} bytes, more than the {limit:,} expected.")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"{path}: {key} is truncated.")
    return np.frombuffer(data, dtype).reshape(got_shape, order="F" if fortran else "C")


def load_params(path: str | os.PathLike | None = None) -> Model:
    """Read a params.npz written by training (default: the last run's, runs/latest/params.npz).

    Each array's declared size, shape and type are checked against the network its configuration
    describes before it is read, and its values must be finite; nothing is unpickled.

    Raises:
      CheckpointError: missing, damaged, from another version, or holding NaN or infinity.
    """
    path = Path(path) if path is not None else latest_checkpoint()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}. Train one first with `python mnist_jax.py` "
                              "(it writes runs/mlp-1/params.npz), or give the path of a params.npz.")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a readable .npz checkpoint (it is not a zip archive). Give the "
                              "params.npz that training wrote.")
    try:
        with zipfile.ZipFile(path) as archive:
            mark = str(_read_npy(archive, "format", path, limit=4096)) if "format.npy" in archive.namelist() else ""
            if mark.startswith(CHECKPOINT_MARK) and mark != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path} was written by another version of mnist_jax ('{mark}'; this one "
                                      f"reads '{CHECKPOINT_FORMAT}'). Train it again with this version.")
            if mark != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path} is not a mnist_jax checkpoint (it has no '{CHECKPOINT_FORMAT}' mark).")
            config = Config.from_json(json.loads(str(_read_npy(archive, "config", path))))
            shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), config.net()))
            leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
            values = []
            for key_path, shape in leaves:
                key = jax.tree_util.keystr(key_path).lstrip(".")
                value = _read_npy(archive, key, path, shape.shape)
                if not np.isfinite(value).all():
                    raise CheckpointError(f"{path}: {key} holds NaN or infinite values, so every prediction would "
                                          "be meaningless. Train the model again.")
                values.append(jnp.asarray(value))
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, KeyError, TypeError, EOFError, OSError, UserError) as e:
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({e.__class__.__name__}: {e}).") from None
    return jax.tree_util.tree_unflatten(treedef, values)


# =============================================================================
# 5. Your own images: make a photo look like MNIST, then predict
# =============================================================================
# MNIST digits are light ink on black, scaled to fit a 20x20 box and placed in
# a 28x28 image with their centre of mass at the centre. A photo of a digit on
# paper is dark on light, anywhere in a frame of any size, so we redo those
# steps: without them a plain resize reads about 9% of the USPS photos right.

class ImageError(UserError):
    """A user's image that cannot be turned into a digit."""


def _image_name(image) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else "the image"


def load_image(image, draft: int | None = None) -> np.ndarray:
    """A path, a PIL image or an array -> grey levels (H, W) float in [0, 1], transparency composited on white.
    `draft`: a JPEG file may be decoded at 1/2, 1/4 or 1/8 of its size, almost for free, keeping both sides
    at least this many pixels (a 12-megapixel photo decodes in a tenth of the time)."""
    name = _image_name(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"no image file at {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as opened:
                    if draft:
                        opened.draft("L", (draft, draft))  # only JPEGs take the hint
                    image = ImageOps.exif_transpose(opened)  # a phone photo taken sideways, turned upright
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{path} is too large for Pillow's safety limit ({Image.MAX_IMAGE_PIXELS:,} pixels); "
                             "crop or shrink it around the digit first.") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{path} is not an image Pillow can read ({e}).") from None
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        if image.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit and float images keep their range
            return np.asarray(image.convert("L"), np.float32) / 255.0
        image = np.asarray(image)
    array = np.asarray(image)
    if array.dtype.kind in "iu" and array.dtype.itemsize > 1:  # 16-bit grey levels: 0..65535
        array = array / min(np.iinfo(array.dtype).max, 65535)
    try:
        array = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError):
        raise ImageError(f"cannot read {name}: an array of {array.dtype} values is not an image") from None
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if array.shape[-1] == 4:  # composite on white
            peak = 255.0 if array.max() > 1 else 1.0  # 0-255 or 0-1 values
            alpha = array[..., 3:] / peak
            array = array[..., :3] * alpha + peak * (1 - alpha)
        array = array[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ImageError(f"{name}: expected a grey (H, W) or colour (H, W, 3 or 4) image, got an array of shape "
                         f"{array.shape}")
    if not np.isfinite(array).all():
        raise ImageError(f"{name} holds NaN or infinite values; give an image whose pixels are numbers")
    return array / 255.0 if array.max() > 1 else array


def fit_28x28(ink: np.ndarray) -> np.ndarray:
    """Ink cropped to its box (ink = 1) -> MNIST's layout: scaled with anti-aliasing so that the longer side
    is 20 px, in a 28x28 image with the centre of mass at pixel (14, 14)."""
    h, w = ink.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.clip(np.asarray(Image.fromarray(ink.astype(np.float32)).resize(size, Image.LANCZOS)), 0, 1)
    small = small / max(float(small.max()), 1e-6)
    ys, xs = np.indices(small.shape)
    mass = small.sum()
    top = int(round(14 - (ys * small).sum() / mass))
    left = int(round(14 - (xs * small).sum() / mass))
    top, left = min(max(top, 0), 28 - small.shape[0]), min(max(left, 0), 28 - small.shape[1])
    result = np.zeros((28, 28), np.float32)
    result[top:top + small.shape[0], left:left + small.shape[1]] = small
    return result


# The steps from a phone photo to MNIST's layout, in order (each shown by `predict FILE --show`).
MIN_INK_CONTRAST = 0.1  # the strongest ink must be at least 10% darker than the paper around it
WORK_SIDE = 320  # the photo's shorter side is brought down to about this: a digit of 15% of it is 48 px tall
MNIST_STROKE = 2.6 / 20  # MNIST's median stroke width, as a fraction of the 20 px box the digit is fitted into
THIN_PEN = 0.75  # strokes under this share of MNIST's width are thickened to about MNIST's (normalise_strokes)
LINE_MARGIN = 2.0  # a printed line varies along its length: take out twice its typical contrast
FAINT_DIGIT = 0.2  # a digit in a row may be this faint beside the row's boldest one (a share of its contrast)
FAINT_STROKE = 0.3  # a faint piece of a digit's stroke reaches this share of the digit's own ink somewhere
DIGIT_WIDTH = 0.8  # a handwritten digit's width, as a share of its height (0s and 2s: 0.9; at 0.7, "00" made 3)
RING = 0.6  # a hole this share of a wide piece's width, in its middle, makes it one digit: a wide 0
TOUCHING = 1.4  # a piece this many times a row's digit height wide is touching digits (at 1.2, a wide 0 was two)
MARGIN_LINE = 0.06  # a lone printed line (a margin) must stand this far above the paper (contrast, 0-1)
LINE_ANGLE = 16  # the page may be turned up to this much (degrees) either way in the photo
LINE_FAN = 16  # and seen at a slant: its lines' angles may differ this much, top to bottom
DOT_GRID = 12  # at least this many small, round, evenly spaced dots make a dotted page (remove_dots)
HOLEY = 10  # ink with more holes than this is a table's grain, not a digit (at the frame's edge; of 5 px, anywhere)
SMALLEST_DIGIT = 0.05  # a digit's box is at least this share of the frame's shorter side (a speck is not one)
FAINTEST_DIGIT = 0.12  # a digit's strongest tenth stands at least this far from its paper (contrast, 0-1)
STRAIGHT = 0.15  # a piece whose ink spreads across its length under this share of along it is a straight stroke
EDGE_SLIVER = 0.25  # a row's end scrap at most this share of its height wide, by the desk, may be the page's edge
ON_THE_TABLE = 0.35  # a box whose brightest tenth (a row's end: its paper) is under this share of the paper's: the table
DESK_DARKER = 0.7  # a desk around the paper is under this share of the paper's brightness
OFF_THE_LINE = 0.75  # a row's group whose middle is this far off the others' line (of their height) is no digit


# --- 1. load, and make a big photo small first --------------------------------------------------------
def shrink(grey: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """The photo with its shorter side brought down to about `side` px, each new pixel the mean of the
    block it covers: everything after this costs time in proportion to the pixels, and a thin pen line
    gets fainter but does not vanish (`find_ink` judges ink against the strongest ink, not a fixed level).
    The longer side is also brought down to at most 8 x `side`: the search for ruled lines costs memory in
    proportion to the longer side squared (a 20000 px strip ran out of memory)."""
    h, w = grey.shape
    if min(h, w) <= 1.5 * side and max(h, w) <= 8 * side:
        return grey
    scale = min(side / min(h, w), 8 * side / max(h, w))
    # Widen the strokes by half the shrink factor first (dark ones on light paper, light ones on a dark
    # board), so that a line drawn with a 1-pixel pen keeps half its contrast instead of a sixth.
    widen = ndimage.minimum_filter if np.median(grey) > 0.5 else ndimage.maximum_filter
    grey = widen(grey, size=int(1 / scale / 2) + 1)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(grey).resize(size, Image.BOX), np.float32)


# --- 2. flatten the light ------------------------------------------------------------------------
def flatten_light(grey: np.ndarray, window: int | None = None,
                  light_on_dark: bool | None = None) -> tuple[np.ndarray, bool]:
    """Ink contrast (H, W) in [0, 1]: 0 where the paper is, near 1 for the darkest ink. Also: was the
    ink lighter than its background (chalk on a blackboard, white on black)? Pass `light_on_dark` if
    that is known already (it does not depend on the window).

    The paper's brightness at each point is estimated by a grey closing: a maximum filter wider than any
    pen stroke (the strokes vanish into the paper around them), then a minimum filter of the same size
    (which brings back the large dark things: a shadow, the table beyond the page). Light falling on the
    page multiplies its brightness, so dividing by the paper's brightness undoes a shadow or a gradient.
    `window` is the filters' size in pixels: by default a third of the shorter side, which keeps the
    table beyond the page whole; `paper_window` gives a narrower one that follows the light better.
    """
    size = max(3, min(grey.shape) // 3)
    # Sensor noise would otherwise raise the paper's maximum; a small image has little noise and thin strokes.
    smooth = ndimage.gaussian_filter(grey, min(1.0, min(grey.shape) / 200))
    if light_on_dark is None:
        light_on_dark = _light_ink(smooth, size)
    if light_on_dark:
        smooth = 1 - smooth
    paper = ndimage.grey_closing(smooth, size=window or size, mode="nearest")
    return np.clip(1 - smooth / np.maximum(paper, 1e-3), 0, 1), bool(light_on_dark)


def _light_ink(smooth: np.ndarray, size: int) -> bool:
    """Is the ink lighter than its background? Remove thin bright things (an opening of `size`); if what
    is left is dark, the background is dark and the ink is the light part. "Dark" is below half the
    photo's brightest part, not a fixed level: a dim photo of paper (at 35%) is still paper, as its
    brightest part is the paper itself. (So chalk less than twice as bright as its board counts as
    dark ink: a looser level turned more photos of paper into boards.) Two more checks keep paper
    as paper: most of a blackboard photo is the board, and a sheet of paper on a dark desk is not a
    stroke."""
    background = np.percentile(ndimage.grey_opening(smooth, size=size), 90)
    if background >= 0.5 * np.percentile(smooth, 99.5):
        return False
    light = smooth > np.mean(np.percentile(smooth, [2, 98]))  # lighter than the middle of the photo's range
    if light.mean() > 0.5:
        return False  # most of the photo is light: paper, darkened everywhere by dense printed lines
    return not _a_sheet_of_paper(light)  # a sticky note, a page on a dark desk, the lit part of a shaded page


def _a_sheet_of_paper(light: np.ndarray) -> bool:
    """Does the photo's `light` part hold paper, not light strokes? A stroke is thin and inside the frame.
    Paper is a light region at least a fifth of the shorter side across that
    - runs along the frame's edge for over a third of its shorter side and is wide, a tenth of that side
      (the lit part of a shaded page; a light stroke on the edge is thin);
    - or has writing on it: the dark holes in it are long, thin strokes (the longest 9 times as long as
      wide, their width under 0.35 of the region's), not the round holes of a bold light 0, 6, 8 or 9;
    - or has some writing on it and nearly fills the smallest rectangle around it at any angle
      (a sticky note on a dark desk)."""
    labels, _ = ndimage.label(light)
    short, (h, w) = min(light.shape), light.shape
    turns = [np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) for a in np.radians(range(0, 90, 3))]
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        rows, cols = box
        if max(rows.stop - rows.start, cols.stop - cols.start) < 0.2 * short:
            continue
        mine = labels[box] == i
        along = ((rows.start == 0) * mine[0].sum() + (rows.stop == h) * mine[-1].sum()
                 + (cols.start == 0) * mine[:, 0].sum() + (cols.stop == w) * mine[:, -1].sum())
        if along > short / 3 and stroke_width(mine) >= 0.1 * short:  # (a chalk stroke on the edge is thin)
            return True
        filled = ndimage.binary_fill_holes(mine)  # with the writing on it
        holes = filled & ~light[box]  # (not the light inside a written 0)
        if not 0.005 * filled.sum() < holes.sum() < 0.2 * filled.sum():
            continue  # paper has some writing on it, and not much: a light 0 is mostly hole
        each, n = ndimage.label(holes)
        longest = each == 1 + np.argmax(ndimage.sum(holes, each, range(1, n + 1)))
        # A stroke L long and w wide has an area of L * w and about 2 * L edge pixels, so L / w = edge^2 / (4 * area).
        if (_edge(longest).sum() ** 2 / (4 * longest.sum()) >= 9
                and stroke_width(holes) < 0.35 * stroke_width(mine)):
            return True
        if min(rows.stop - rows.start, cols.stop - cols.start) < 0.35 * short or holes.sum() < 0.01 * filled.sum():
            continue
        rim = np.argwhere(_edge(filled)).astype(float)
        rectangle = min(np.prod(np.ptp(rim @ turn, axis=0) + 1) for turn in turns)
        if filled.sum() >= 0.88 * rectangle:
            return True
    return False


def _frame_sides(image: np.ndarray) -> list[np.ndarray]:
    """The image's outermost rows and columns: top, bottom, left, right."""
    return [image[0], image[-1], image[:, 0], image[:, -1]]


def _edge(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels that touch its outside."""
    return mask & ~ndimage.binary_erosion(mask)


def stroke_width(mask: np.ndarray) -> float:
    """The typical width in pixels of the strokes in a mask. A stroke of width w and length L covers
    w * L pixels and has about 2 * L edge pixels, so 2 * area / edge pixels measures the width
    without tracing the strokes."""
    return 2 * mask.sum() / max(1, _edge(mask).sum())


def paper_window(contrast: np.ndarray) -> int:
    """The window for `flatten_light` that fits this photo: three times its strokes' width, so that
    every stroke still vanishes into the paper around it, but no wider, so that the estimate follows a
    vignette's dark corners and the soft edge of a hand's shadow (a third of the frame did not: they
    were left as grey rings and blobs that outweighed the digit). At least 6% of the shorter side, at
    most a third. The strokes are the clearly dark pieces of `contrast` (flattened with the default
    window) that do not touch the frame, where the vignette or the table would count as wide strokes."""
    strong = contrast > 0.5 * np.percentile(contrast, 99.5)
    labels, _ = ndimage.label(strong, structure=np.ones((3, 3)))
    inner = strong & ~np.isin(labels, np.concatenate(_frame_sides(labels)))
    side = min(contrast.shape)
    width = stroke_width(inner if inner.sum() >= 20 else strong)  # (a digit touching the frame: all of it)
    return max(3, int(np.clip(3 * width, 0.06 * side, side / 3)))


# --- 3. the desk beyond the paper, and the frame's edge -----------------------------------------------
def _along_the_edge(mask: np.ndarray, least: float) -> tuple[np.ndarray, np.ndarray]:
    """The pieces of `mask` that run along more than `least` of a side of the frame (within a band of 6%
    of the frame's size: the very edge may be missing), and the part of them that is the table itself.

    Only pieces that stay near their side count, reaching at most halfway into the frame: a table, not a
    big digit. A digit written near the table joins its piece, but only over some of its columns, and the
    page's edge is straight. So the table's part is what lies within the straight line that follows how
    far the piece reaches in, column by column, where no digit sticks out (`_straight_edge`).
    Returns two masks: the whole pieces, and their table parts."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    h, w = mask.shape
    depth = max(2, round(0.06 * min(h, w)))
    pieces, table = np.zeros_like(mask), np.zeros_like(mask)
    boxes = [None] + ndimage.find_objects(labels)
    for side, band in enumerate((labels[:depth], labels[-depth:], labels[:, :depth].T, labels[:, -depth:].T)):
        for i in np.unique(band[band > 0]):
            rows, cols = boxes[i]
            reach_in = [rows.stop / h, (h - rows.start) / h, cols.stop / w, (w - cols.start) / w][side]
            spots = np.nonzero((band == i).any(axis=0))[0]  # where along this side the piece is
            if reach_in > 0.5 or (spots.max() - spots.min() + 1) / band.shape[1] <= least:
                continue
            piece = labels[rows, cols] == i
            pieces[rows, cols] |= piece
            # The piece and its table part turned so that their side is at the top (views: they share memory).
            part = np.zeros_like(piece)
            seen, seen_part = [(a, a[::-1], a.T, a.T[::-1])[side] for a in (piece, part)]
            present = seen.any(axis=0)
            reach = np.where(present, len(seen) - np.argmax(seen[::-1], axis=0), 0)  # how far in, per column
            seen_part |= seen & (np.arange(len(seen))[:, None] < _straight_edge(reach, present))
            table[rows, cols] |= part
    return pieces, table


def _straight_edge(reach: np.ndarray, present: np.ndarray) -> np.ndarray:
    """How far in the table reaches at each column where the piece is `present` (and 1 px more, rounded up):
    a straight line, as a page's edge is straight. It is fitted to the columns that reach in least (a
    digit touching the table only ever reaches further in), then twice more to the columns that reach no
    further in than the last line by 2 px or twice their typical distance from it."""
    x, y = np.flatnonzero(present), reach[present].astype(float)
    edge = y <= np.median(y)
    for _ in range(3):
        slope, start = np.polyfit(x[edge], y[edge], 1) if edge.sum() > 1 else (0.0, float(np.median(y[edge])))
        off = y - (slope * x + start)
        edge = off <= max(2.0, 2 * float(np.median(np.abs(off[edge]))))
    return np.where(present, np.ceil(slope * np.arange(len(reach)) + start + 1), 0)


def otsu_level(values: np.ndarray) -> float:
    """Otsu's threshold: the level that splits the values into the two classes that lie furthest apart (the
    largest spread between the classes' means, each weighted by its share of the values)."""
    counts, edges = np.histogram(values, bins=128)
    levels = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    sums = np.cumsum(counts * levels)
    spread = below * above * (sums / np.maximum(below, 1) - (sums[-1] - sums) / np.maximum(above, 1)) ** 2
    return float(levels[np.argmax(spread)])


def off_the_paper(grey: np.ndarray) -> np.ndarray:
    """Where the photo shows the desk around the paper (a page, a sticky note lying on it), as a mask: all
    False if no desk is seen. A wooden desk's grain and the edge of a note are ink to `find_ink`; left in,
    they were cut out as the digit.

    A grey closing 4% of the shorter side wide takes away the pen's strokes; Otsu's level then splits what is
    left into paper and darker things. The darker part is a desk if it is
    - clearly darker, under DESK_DARKER of the paper's brightness;
    - sharply bordered, as a page's edge is: beside the desk (closed over its grain), on the paper's side
      within twice the opening's reach, the pixels halfway between the two levels number under 1.2% of the
      shorter side per pixel of the border. They are counted in a copy opened as well as closed, from
      which a pale desk's broad light grain is gone. Only the paper's half of an edge counts, so an edge
      that goes from dark to light within about 5% of the shorter side is sharp; a shadow's is softer,
      and its dark side is paper;
    - wide (what an opening of 3% of the shorter side in radius leaves: nothing under about 6% wide, such as
      a marker's stroke, and the frame's corners lose as much), and seen around the
      paper: along a third of two sides of the frame or more (a corner, or all around a note); in all, at
      least 2% of the frame. (A table along one side is `drop_frame_edge`'s: it cuts along the page's
      straight edge, and keeps a digit standing on the table. One reaching over a third of the way in
      also runs along two more sides, and counts as a desk.)
    - not across the page: a dark band with a large piece of paper on either side of it is a hard-edged
      shadow over the page (a lamp's, of a pen or a ruler), with the writing in it, not the desk beyond
      the page's edge (`_across_the_page`). (Where such a shadow runs into the desk, the two are one dark
      piece, and neither is taken for the desk.)
    The mask reaches 1% of the shorter side into the paper, over the paper's edge."""
    short = min(grey.shape)
    size = max(3, round(0.04 * short))
    closed = ndimage.grey_closing(grey, size=size)
    level = otsu_level(closed.ravel())
    dark = closed <= level
    no_desk = np.zeros_like(dark)
    if not 0.02 <= dark.mean() < 1:
        return no_desk
    paper_level, dark_level = float(closed[~dark].mean()), float(closed[dark].mean())
    if dark_level > DESK_DARKER * paper_level:
        return no_desk
    reach = max(1, round(0.03 * short))
    labels, _ = ndimage.label(ndimage.binary_opening(dark, iterations=reach))
    along = sum(np.bincount(side, minlength=labels.max() + 1) >= len(side) / 3 for side in _frame_sides(labels))
    around = [i for i in np.nonzero(along[1:] >= 2)[0] + 1 if not _across_the_page(labels == i, dark)]
    desk = np.isin(labels, around)
    if desk.mean() < 0.02:
        return no_desk
    # Sharply bordered? Counted just beside the desk, on the paper's side, and after a grey opening as
    # well: a pale desk's broad light grain lies halfway between the two levels too, but inside the desk.
    smooth = ndimage.grey_opening(closed, size=size)
    solid = ndimage.binary_closing(desk, iterations=reach, border_value=1)  # (the grain's light streaks closed)
    border = solid & ~ndimage.binary_erosion(solid, border_value=1)  # (the frame's edge is no border)
    beside = ndimage.binary_dilation(solid, iterations=2 * reach) & ~solid
    halfway = np.abs(smooth - (paper_level + dark_level) / 2) < 0.25 * (paper_level - dark_level)
    if (halfway & beside).sum() > 0.012 * short * max(1, border.sum()):
        return no_desk
    # Back to the photo itself, where the paper between the desk and a digit near it is light again: the
    # desk is what is dark there, joined to what the opening kept, and near it (its thin corners, the
    # ends of the printed lines that run into it).
    dark_here, _ = ndimage.label(ndimage.gaussian_filter(grey, 1) <= level)
    near = ndimage.binary_dilation(desk, iterations=2 * reach)
    desk = near & np.isin(dark_here, np.unique(dark_here[desk & (dark_here > 0)]))
    return ndimage.binary_dilation(desk, iterations=max(1, round(0.01 * short)))


def _across_the_page(piece: np.ndarray, dark: np.ndarray, least: float = 0.03) -> bool:
    """Does this dark piece (a mask) cut the page in two? Without it, the frame falls apart into two or
    more parts, each with paper (not `dark`) over at least `least` of the frame. The desk lies beyond
    the page, between it and the frame's edge; a shadow across the page has the page on both sides."""
    reach = max(2, round(0.02 * min(dark.shape)))  # (past the piece's own edge, to the paper beside it)
    parts, n = ndimage.label(~ndimage.binary_dilation(piece, iterations=reach))
    return int((np.bincount(parts[~dark], minlength=n + 1)[1:] >= least * dark.size).sum()) >= 2


def drop_frame_edge(contrast: np.ndarray, wide: np.ndarray | None = None) -> np.ndarray:
    """The contrast without the dark things that run along the frame's edge: the table beyond the page,
    the page's edge, cut by the frame. They are found as the clearly dark pieces (above 40% of the
    strongest contrast) that run along a third of a side or more, and their table parts (not a digit
    written close to the table) are taken out with a margin for their soft borders. A digit may touch
    the frame too, so if not even faint ink would be left beside the whole pieces (a faint pencil digit
    beside a dark table is left), only the table part of what runs along most of a side goes.
    They are looked for in `wide` if given: the contrast against the default, wide window, in which the
    table stays one long dark piece (a narrow window flattens most of it into grain, and leaves its
    corner as a short dark sliver that no longer runs along the edge).
    What is taken out becomes NaN, not 0: it is not the page, so it does not count when the printed
    lines' contrast along the page is measured next."""
    look_in = contrast if wide is None else wide
    soft = ndimage.gaussian_filter(look_in, 2)  # a table's grain would break it into bits
    strongest = float(np.percentile(soft, 99.9))
    clear = soft > 0.4 * strongest
    margin = max(1, round(0.03 * min(contrast.shape)))
    pieces, table = _along_the_edge(clear, 1 / 3)
    faint = ndimage.gaussian_filter(look_in, 1) > 0.1 * strongest  # (without the wide blur's halo)
    if (faint & ~ndimage.binary_dilation(pieces, iterations=margin)).sum() < 0.002 * faint.size:
        table = _along_the_edge(clear, 0.8)[1]  # not even faint ink would be left beside the whole pieces
    return np.where(ndimage.binary_dilation(table, iterations=margin), np.nan, contrast)


# --- 4. the ruled and squared lines of the paper, and a dotted page's dots ----------------------------
def _straighten(image: np.ndarray, angle: float, fan: float = 0.0) -> tuple[np.ndarray, tuple]:
    """Rows of `image` taken along straight lines: row r of the result follows the line that crosses the
    middle column at height r - pad, turned by `angle` degrees plus `fan` degrees times its height's
    distance from the middle row, as a fraction of the image's height: from angle - fan/2 at the top to
    angle + fan/2 at the bottom (NaN where the line is outside the image). Seen at a slant, a page's parallel lines
    meet far away, so their angle changes steadily down the page: the fan. Also the (rows, columns) it
    was read at, in the photo padded with NaN rows above and below."""
    h, w = image.shape
    pad = int(np.ceil(w / 2 * np.tan(np.radians(LINE_ANGLE + LINE_FAN / 2)))) + 1
    padded = np.pad(image, ((pad, pad), (0, 0)), constant_values=np.nan)
    row = np.arange(h + 2 * pad)[:, None]
    slope = np.tan(np.radians(angle + fan * ((row - pad) / h - 0.5) if fan else angle))  # (no fan: one slope for all)
    rows = row + np.rint((np.arange(w) - w / 2) * slope).astype(int)
    where = (np.clip(rows, 0, h + 2 * pad - 1), np.arange(w))
    return padded[where], where


def _line_direction(image: np.ndarray) -> tuple[float, float]:
    """The angle and fan (see `_straighten`) at which the mean contrast along straight lines varies
    most: those of printed lines, if any. (Each line's mean counts as many times as it has pixels, so
    that a short line across a corner does not count as much as a long one, and a band of paper of even
    contrast scores about 0 at every angle; sums instead of means favoured angles that keep every line long.)

    The angle is found in whole degrees, then in tenths around the best (a line must be followed to
    within a pixel across the photo). The fan comes from the lines' angles in the top and bottom thirds
    of the photo, found the same way, and is kept if it lines them up better; every other pixel is
    enough to tell."""
    def score(image, angle, fan=0.0, flat=None):
        if fan:
            rows = _straighten(image, angle, fan)[0]
            sums, counts = np.nansum(rows, axis=1), np.isfinite(rows).sum(axis=1)
        else:  # the same sums, added up by np.bincount without building the rows: three times faster
            h, w = image.shape
            row = np.arange(h)[:, None] - np.rint((np.arange(w) - w / 2) * np.tan(np.radians(angle))).astype(int)
            row = (row - row.min()).ravel()
            values, finite = flat or flattened(image)
            sums, counts = np.bincount(row, values), np.bincount(row, finite)
        return np.sum(sums[counts > 0] ** 2 / counts[counts > 0]) - sums.sum() ** 2 / max(1, counts.sum())

    def flattened(image):  # its values with NaN as 0, and where it has values, both flat
        return np.nan_to_num(image).ravel(), np.isfinite(image).ravel()

    def best(image, angles, fans=(0.0,)):  # the (angle, fan) of the highest score
        flat = flattened(image)  # once for all the angles tried, not once per angle
        return max(((a, f) for a in angles for f in fans), key=lambda pair: score(image, *pair, flat=flat))

    def best_angle(image, around=0.0, half=6, step=0.1):
        angle, _ = best(image, _nearest_first(round(around), half, 1.0))
        return best(image, _nearest_first(angle, 0.6, step))[0]

    small = image[::2, ::2]
    angle = best_angle(small, half=LINE_ANGLE)
    third = len(small) // 3  # the angles of the top and bottom thirds, at rows h/6 and 5h/6
    if third < 2:
        return angle, 0.0  # (a photo a few pixels tall has no thirds to compare)
    top, bottom = (best_angle(band, angle, half=6, step=0.2) for band in (small[:third], small[-third:]))
    fan = float(np.clip(1.5 * (bottom - top), -LINE_FAN, LINE_FAN))  # (the thirds' middles are 2/3 h apart)
    if abs(fan) < 0.5 or score(small, (top + bottom) / 2, fan) <= score(small, angle):
        return angle, 0.0
    angle, fan = best(small, [(top + bottom) / 2], _nearest_first(fan, 2, 0.25))
    angle, fan = best(small, _nearest_first(angle, 0.3, 0.1), [fan])
    return best(small, [angle], _nearest_first(fan, 0.2, 0.1))


def _nearest_first(centre: float, half: float, step: float) -> np.ndarray:
    """centre, centre -+ step, centre -+ 2 step, ... out to -+ half: where two score the same (a turn too
    small to move any pixel of a small image), `max` keeps the first, the nearest to what was found so far."""
    offsets = np.arange(step, half + step / 2, step)
    return np.concatenate([[centre], np.column_stack([centre - offsets, centre + offsets]).ravel()])


def remove_lines(contrast: np.ndarray) -> tuple[np.ndarray, float | None]:
    """The contrast with the paper's ruled and squared lines (and a margin line) taken out, and the
    page's angle in degrees if there were ruled lines to tell it (else None).

    A printed line is long, straight and the same all along; a digit is none of these. Adding up the
    contrast along straight lines at each angle the page may be turned by (and fanned out by, if the
    page was seen at a slant), printed lines make a few lines' means stand out when the angle is right. Then,
    along each line at that angle, the contrast that nearly all of the line has (a low percentile, so a
    digit crossing it does not count), above that of a typical row of paper, is the printed line's, and
    is subtracted: a stroke lying on a printed line keeps its own contrast. NaN pixels (not the page:
    `drop_frame_edge`) count as outside the photo, and come back as 0.
    Both directions are measured on the contrast as it came, and taken out together at the end: measured
    after the lines across were taken out, the lines down squared paper have a gap at every crossing,
    which pulled their measured level down so far that most of them stayed.
    """
    found = []  # for lines across (ruled and squared paper), then down (squared paper, a margin)
    for across in (True, False):
        image = contrast if across else contrast.T
        angle, fan = _line_direction(image)
        straight, where = _straighten(image, angle, fan)  # each printed line is now one row
        inside = np.isfinite(straight).sum(axis=1)
        # A line's level, not a stroke's: the 15th percentile of each row's pixels inside the photo (a
        # sort puts the NaNs outside it last; np.nanpercentile along rows is ten times slower).
        ranked = np.sort(straight, axis=1)
        line = ranked[np.arange(len(straight)), np.maximum(inside - 1, 0) * 15 // 100]
        whole = ranked[np.arange(len(straight)), np.maximum(inside - 1, 0) * 2 // 100]  # all but 2% of it
        on_page = inside >= 0.5 * image.shape[1]
        if on_page.any():  # above the typical row's level: in a grainy photo every row of paper has one
            typical = np.median(line[on_page])
            line, whole = line - typical, whole - typical
        line[(line < 0.03) | ~on_page] = 0
        found.append(dict(across=across, image=image, angle=angle, line=line, where=where,
                          count=ndimage.label(line)[1], whole=whole[on_page].max(initial=0)))
    page_angle = None
    printed = np.zeros(contrast.shape)  # the printed lines' contrast
    for this, other in zip(found, found[::-1]):
        across, image, angle, line, where = (this[k] for k in ("across", "image", "angle", "line", "where"))
        # Printed lines come in numbers: fewer than 3 are no lines (a 1 filling the frame is not one), unless
        # the other way has printed lines and this one stands out clearly along all of its length, from
        # edge to edge of the photo: the margin line of ruled paper, not a pen's 1 written as tall as the photo.
        margin = other["count"] >= 3 and this["whole"] >= MARGIN_LINE
        if this["count"] < 3 and not margin:
            continue
        lines_here = np.zeros((len(line), image.shape[1]))  # back from rows to the photo
        np.maximum.at(lines_here, where, LINE_MARGIN * line[:, None])
        pad = (len(line) - image.shape[0]) // 2
        lines_here = ndimage.grey_dilation(lines_here[pad:pad + image.shape[0]], size=(3, 1))  # soft edges too
        printed += lines_here if across else lines_here.T
        if page_angle is None:
            page_angle = angle if across else -angle
    return np.nan_to_num(np.clip(contrast - printed, 0, 1)), page_angle


def _dot_like(labels: np.ndarray, n: int, side: int) -> np.ndarray:
    """Which of the n labelled pieces of ink (label i + 1 at index i) look like printed dots: small (under
    5% of the photo's shorter `side`), round and filled, and within a factor of 2 of their median area."""
    boxes = ndimage.find_objects(labels)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    tall = np.array([b[0].stop - b[0].start for b in boxes])
    wide = np.array([b[1].stop - b[1].start for b in boxes])
    extent = np.maximum(tall, wide)
    dot = (extent <= 2 * np.minimum(tall, wide) + 1) & (area >= 0.5 * tall * wide) & (extent <= 0.05 * side)
    if dot.any():
        typical = np.median(area[dot])
        dot &= (area >= typical / 2) & (area <= 2 * typical)
    return dot


def remove_dots(contrast: np.ndarray) -> np.ndarray:
    """The contrast with a dotted page's dots taken out (a dot-grid notebook's).

    A printed dot is small, round and filled, and the dots of a page are all alike and evenly spaced:
    each has its nearest neighbour at about the same distance, several times its own size. Bits of a
    digit are none of these together, and a pencil's grain is not evenly spaced. At least DOT_GRID
    such dots, and 80% of the dot-like pieces, make a dotted page; fewer are left alone. Left in,
    dots next to a digit joined it (a 9 with four dots around it was read as a 4)."""
    labels, n = ndimage.label(find_ink(contrast), structure=np.ones((3, 3)))
    dots = np.nonzero(_dot_like(labels, n, min(contrast.shape)))[0] if n >= DOT_GRID else []
    if len(dots) < DOT_GRID:
        return contrast
    from scipy.spatial import cKDTree  # (imported here, as only a photo with dots needs it)
    boxes = ndimage.find_objects(labels)
    centres = np.array([[(boxes[i][0].start + boxes[i][0].stop) / 2, (boxes[i][1].start + boxes[i][1].stop) / 2]
                        for i in dots])
    size = np.median([max(boxes[i][0].stop - boxes[i][0].start, boxes[i][1].stop - boxes[i][1].start) for i in dots])
    nearest = cKDTree(centres).query(centres, k=2)[0][:, 1]  # each dot's nearest other dot (a tree: n log n)
    spacing = np.median(nearest)
    even = np.abs(nearest - spacing) <= 0.25 * spacing
    if spacing < 3 * size or even.sum() < max(DOT_GRID, 0.8 * len(dots)):  # (of random specks, under half are)
        return contrast
    dotted = ndimage.binary_dilation(np.isin(labels, dots[even] + 1))  # with their soft rims
    return np.where(dotted, 0.0, contrast)


# --- 5. find the ink, and keep what may be handwriting ------------------------------------------------
def paper_grain(contrast: np.ndarray) -> float:
    """The contrast that plain paper's grain and noise reach: most of a photo is paper (a big digit, half)."""
    return 0.04 + 3 * float(np.percentile(np.nan_to_num(contrast), 25))


def find_ink(contrast: np.ndarray, faint: bool = True, level: float = 0.5) -> np.ndarray:
    """Ink mask: what stands out from the paper, relative to the strongest ink in the photo.

    The strongest ink (a high percentile of what is clearly above the noise) sets two thresholds: a
    pixel is ink if it is above half of it, or above a quarter of it and joined to such a pixel
    (hysteresis: the faint parts of a pencil stroke stay attached to their stroke). With `faint`, the
    joined part may be fainter still where the paper is clean: down to three times the photo's 95th
    percentile (mostly paper). A thin pen's stroke fades in places, far below its darkest blot but far
    above clean paper; cut there, the digit lost a stroke. A row is found without `faint`: there, such
    faint ink (a blur, a smudge) also joined neighbouring digits into one.
    `level` is the share of the strongest ink that a stroke must reach somewhere (its joined parts may
    be half as strong): `fainter_digits` looks again at a lower level.
    """
    noise = paper_grain(contrast)
    marked = contrast > noise
    if marked.sum() < 5:
        return marked
    strongest = float(np.percentile(contrast[marked], 95))
    if strongest < MIN_INK_CONTRAST and marked.mean() > 0.05:
        # A photo mostly in deep shadow: dividing by dark paper magnifies the sensor's grain, which then
        # outnumbers a small digit's pixels. Judge again above the grain (the top 5% of the photo): ink
        # must stand three times higher than that; grain alone does not.
        noise = float(np.percentile(contrast, 95))
        marked = contrast > noise
        strongest = float(np.percentile(contrast[marked], 95)) if marked.sum() >= 5 else 0.0
        if strongest < 3 * noise:
            strongest = 0.0
    if strongest < MIN_INK_CONTRAST:  # nothing darker than the paper's own grain: no ink at all
        return np.zeros_like(marked)
    strong = marked & (contrast > max(noise, level * strongest))
    joined = min(level / 2 * strongest, 3 * float(np.percentile(contrast, 95))) if faint else level / 2 * strongest
    weak = marked & (contrast > max(noise, joined))
    labels, _ = ndimage.label(weak, structure=np.ones((3, 3)))
    return np.isin(labels, np.unique(labels[strong])) & weak


def ink_parts(mask: np.ndarray, contrast: np.ndarray) -> list[dict]:
    """The connected pieces of ink, as dicts of label, box (top, left, bottom, right), area, level (mean
    contrast) and mass (the contrast of their clearly dark pixels: a faint shadow's edge has little),
    without specks."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    dark = float(np.percentile(contrast[mask], 90)) if mask.any() else 1.0
    parts = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        mine = contrast[box][labels[box] == i]
        parts.append(dict(label=i, box=(box[0].start, box[1].start, box[0].stop, box[1].stop), area=mine.size,
                          level=float(mine.mean()), mass=float(mine[mine > 0.5 * dark].sum()), labels=labels))
    if not parts:
        return []
    # A piece cut by the frame along a tenth of its side or more is the table, a shadow, the page's edge
    # (a stroke that runs off the frame is cut along its width only): dropped, unless nothing else is left.
    long_cut, touching = set(), set()
    for band in _frame_sides(labels):
        cut_here = np.bincount(band, minlength=len(parts) + 1)[1:]
        long_cut.update(np.nonzero(cut_here >= 0.1 * len(band))[0] + 1)
        touching.update(np.nonzero(cut_here)[0] + 1)
    # So is a piece at the frame riddled with holes: the grain of a dark table, where the table beyond the
    # page was not all taken out (a digit's strokes leave a few holes: at most 6 in our photos' rows).
    for i in touching - long_cut:
        top, left, bottom, right = parts[i - 1]["box"]
        if _holes(labels[top:bottom, left:right] == i) > HOLEY:
            long_cut.add(i)
    if len(long_cut) < len(parts):
        parts = [p for p in parts if p["label"] not in long_cut]
    boxes, areas = np.array([p["box"] for p in parts]), np.array([p["area"] for p in parts])
    biggest_ten = sorted(parts, key=lambda p: p["area"])[-10:]  # (a note's edge is among them: time stays bounded)
    outlines = {p["label"] for p in biggest_ten if _outline_around_ink(p, parts, boxes, areas, labels)}
    if len(outlines) < len(parts):
        parts = [p for p in parts if p["label"] not in outlines]
    biggest = max(p["area"] for p in parts)
    side = max(max(p["box"][2] - p["box"][0], p["box"][3] - p["box"][1]) for p in parts)
    parts = [p for p in parts if p["area"] >= max(3, 0.03 * biggest) and
             max(p["box"][2] - p["box"][0], p["box"][3] - p["box"][1]) >= 0.1 * side]
    edges = _page_edges(parts, labels)
    return [p for p in parts if p["label"] not in edges] if len(edges) < len(parts) else parts


def _holes(mask: np.ndarray, least: int = 1) -> int:
    """How many holes a piece of ink (a mask cut to its box) has: pieces of paper it closes all around, of
    at least `least` pixels."""
    paper, _ = ndimage.label(~np.pad(mask, 1))
    return int((np.bincount(paper.ravel())[1:] >= least).sum()) - 1  # (less the paper outside it)


def _page_edges(parts: list[dict], labels: np.ndarray) -> set[int]:
    """The labels of the pieces that are an edge, not a digit: what is left of the page's edge once the
    table beyond it went (a thin dark line where the two meet), the edge of a sheet under the page, a fold.
    An edge is at least twice as long as the other pieces are (as their median: a digit of a row, or one
    filling a tight crop, is not), and they have a tenth of its ink or more (a 1 with a speck stays). It is
    - a piece that touches two sides of the frame, where it touches them spanning half the photo's longer
      side or more: it runs across the photo (a digit that the frame cuts runs off it in one place); or
    - a straight line within 20 degrees of a side and 0.6 of that side long or more: its ink's spread
      across the line (root mean square) is under 3% of its length."""
    h, w = labels.shape
    size = {p["label"]: max(p["box"][2] - p["box"][0], p["box"][3] - p["box"][1]) for p in parts}
    places = np.stack(np.indices(labels.shape), axis=-1)  # (row, column) of each pixel
    sides = list(zip(_frame_sides(labels), _frame_sides(places)))
    edges = set()
    for p in parts:
        others = [q for q in parts if q is not p]
        if (not others or size[p["label"]] < 2 * np.median([size[q["label"]] for q in others])
                or sum(q["area"] for q in others) < 0.1 * p["area"]):
            continue
        touched = [where[side == p["label"]] for side, where in sides]
        contacts = np.concatenate(touched)
        if (sum(len(t) > 0 for t in touched) >= 2
                and np.hypot(*np.ptp(contacts, axis=0)) >= 0.5 * max(h, w)):
            edges.add(p["label"])
            continue
        top, left, bottom, right = p["box"]
        if max(bottom - top, right - left) < 0.6 * min(h, w):
            continue
        points = np.argwhere(labels[top:bottom, left:right] == p["label"]).astype(float)
        spread, directions = np.linalg.eigh(np.cov(points.T))  # the line's direction: the largest spread
        down, sideways = np.abs(directions[:, 1])
        length = np.ptp(points @ directions[:, 1])
        along_a_side = (sideways >= np.cos(np.radians(20)) and length >= 0.6 * w or
                        down >= np.cos(np.radians(20)) and length >= 0.6 * h)
        if along_a_side and np.sqrt(max(spread[0], 0)) <= 0.03 * length:
            edges.add(p["label"])
    return edges


def _outline_around_ink(part: dict, parts: list[dict], boxes: np.ndarray, areas: np.ndarray,
                        labels: np.ndarray) -> bool:
    """Is this piece a closed outline with ink inside it (the edge of a sticky note, a box drawn around the
    digit)? Inside: another piece, of at least a tenth of its pixels, all within its filled outline. A 0, a 6,
    an 8 or a 9 has only specks in its loops, if anything. (`boxes` and `areas`: those of `parts`.)"""
    top, left, bottom, right = part["box"]
    inside = np.nonzero((boxes[:, 0] > top) & (boxes[:, 1] > left) & (boxes[:, 2] < bottom) & (boxes[:, 3] < right)
                        & (areas >= 0.1 * part["area"]))[0]
    if not inside.size:
        return False
    window = labels[top:bottom, left:right]
    filled = ndimage.binary_fill_holes(window == part["label"])
    return any(filled[window == parts[i]["label"]].all() for i in inside[:10])


# --- 5. (continued) keep the digit: the main group of strokes --------------------------------------
def _near(a, b, gap):
    """Are two boxes (top, left, bottom, right) within `gap` px of each other?"""
    return (a[0] - gap < b[2] and b[0] - gap < a[2]) and (a[1] - gap < b[3] and b[1] - gap < a[3])


def _shared_rows(a, b) -> int:
    """How many rows two boxes (top, left, bottom, right) share: their overlap up and down, in px (< 0: apart)."""
    return min(a[2], b[2]) - max(a[0], b[0])


def _shared_columns(a, b) -> int:
    """How many columns two boxes (top, left, bottom, right) share: their overlap sideways, in px (< 0: apart)."""
    return min(a[3], b[3]) - max(a[1], b[1])


def _union(boxes):
    boxes = np.array(boxes)
    return (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())


def keep_digit(parts: list[dict]) -> list[dict]:
    """The main group of strokes: the piece with the most ink, and the pieces about as dark as it (the same
    pen, not a faint line or shadow) that belong with it. Either near it (within a quarter of its size) and
    no bigger: the two strokes of a 4, a 5's flag close to its body. Or above or below it, overlapping it
    sideways, within 0.6 of its size and at most 1.25 times as big: a 5's flag written with the pen lifted
    often floats that far, and is often wider than the body (a quarter of the size left it out)."""
    main = max(parts, key=lambda p: p["mass"])
    group = [main]
    grown = True
    while grown:
        box = _union([p["box"] for p in group])
        size = max(box[2] - box[0], box[3] - box[1])

        def belongs(part):
            top, left, bottom, right = part["box"]
            extent = max(bottom - top, right - left)
            beside = _near(part["box"], box, 0.25 * size) and extent <= size
            overlap = _shared_columns(part["box"], box)
            gap = max(top - box[2], box[0] - bottom)  # up or down, in px
            stacked = overlap >= 0.5 * (right - left) and gap <= 0.6 * size and extent <= 1.25 * size
            return (beside or stacked) and part["level"] > 0.6 * main["level"]

        more = [p for p in parts if p not in group and belongs(p)]
        group += more
        grown = bool(more)
    return group


def _straight_stroke(rows: np.ndarray, cols: np.ndarray) -> tuple[bool, float]:
    """Is a piece of ink (its pixels' rows and columns) one straight stroke, and at what angle to the
    vertical (degrees, 0-90)? From the spread of its pixels (their covariance): along its length, and
    across it, under STRAIGHT of that."""
    if len(rows) < 3:
        return False, 0.0
    across, along = np.linalg.eigh(np.cov(np.stack([rows, cols]).astype(np.float64)))
    direction = along[:, 1]  # (row, column) of the longer axis
    straight = np.sqrt(max(across[0], 0.0)) < STRAIGHT * np.sqrt(max(across[1], 1e-12))
    return bool(straight), float(np.degrees(np.arctan2(abs(direction[1]), abs(direction[0]))))


def looks_like_a_digit(mine: np.ndarray, contrast: np.ndarray) -> bool:
    """Could this ink (a mask: a digit's pixels with its faint strokes, in `contrast`) be a handwritten
    digit? On a page with no digit, what is left is what the earlier steps did not take out: a speck,
    scraps of a ruled line (where a shadow or a slant bent it), the grid's lines side by side, a corner
    of a wooden table, the faint remains of a shadow's edge. So not a digit are: a box under
    SMALLEST_DIGIT of the frame's shorter side; ink whose strongest tenth stands under FAINTEST_DIGIT
    from its paper in `contrast` (measured in the shrunk photo, where a very light, thin pencil line
    is fainter than it was); ink riddled with holes (over HOLEY of 5 px or more: a table's grain);
    and, leaving out scraps under a fifth of the biggest piece, pieces that are all thin straight
    strokes lying within 30 degrees of flat (no digit is a '-'), or two or more thin straight strokes,
    parallel and side by side (a 1 that faded in two is one above the other)."""
    rows, cols = np.nonzero(mine)
    side = min(contrast.shape)
    if not len(rows) or max(np.ptp(rows), np.ptp(cols)) + 1 < SMALLEST_DIGIT * side:
        return False
    if np.percentile(np.nan_to_num(contrast[rows, cols]), 90) < FAINTEST_DIGIT:
        return False
    ink = mine[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    # Holes of 5 px or more in a photo of WORK_SIDE (more in a bigger one): a pencil's grain leaves many
    # smaller pinholes in a faint digit's strokes.
    if _holes(ink, least=int(np.ceil(max(5.0, 5.0 * (side / WORK_SIDE) ** 2)))) > HOLEY:
        return False
    labels, _ = ndimage.label(ink, structure=np.ones((3, 3)))
    area = np.bincount(labels.ravel())[1:]
    pieces = [i + 1 for i in np.nonzero(area >= 0.2 * area.max())[0]]
    strokes = [_straight_stroke(*np.nonzero(labels == i)) for i in pieces]
    if not all(straight for straight, _ in strokes):
        return True
    angles = [angle for _, angle in strokes]
    if min(angles) > 60:  # (not 45: a 1 slanted 30 degrees on a page turned 16 is at 46 in the photo)
        return False
    boxes = [(r.start, c.start, r.stop, c.stop) for r, c in ndimage.find_objects(labels)]
    boxes = [boxes[i - 1] for i in pieces]
    side_by_side = any(_shared_rows(a, b) >= 0.5 * min(a[2] - a[0], b[2] - b[0])
                       for i, a in enumerate(boxes) for b in boxes[i + 1:])
    return not (side_by_side and max(angles) - min(angles) < 10)


def pixels_of(parts: list[dict]) -> np.ndarray:
    """A mask of the pieces' pixels in the whole photo."""
    return np.isin(parts[0]["labels"], [p["label"] for p in parts])


def with_faint_strokes(group: list[dict], contrast: np.ndarray, kept: list[dict] = (), size: float = 0) -> np.ndarray:
    """The digit's pixels (a mask): the pieces of its group, and the fainter pieces of ink beside them
    (and its own strokes' soft edges, down to a tenth of its ink).

    Why: a thin pen or a pencil fades in places, and `find_ink` judges ink against the strongest ink in
    the photo, so a stroke that fades to a third of its blots comes out in pieces, and the faint pieces
    are left out (a 5 without its middle stroke is read as a 1). Here the ink that `find_ink` did not
    find at all is judged again, against the digit's own ink: a piece joins if it is darker than the
    paper's grain and a tenth of the digit's ink, reaches FAINT_STROKE of it somewhere, has at least 2%
    as many pixels as the digit (and 3), and comes within 15% of the digit's size of it, across or down
    (up to eight rounds, as pieces join: a pen that skipped leaves a stroke of dashes). What `find_ink`
    found and left out stays out if it is another piece that was `kept` (a neighbour in a row) or bigger
    than the digit (a box drawn around it, the table): a scrap dropped as a speck may be a piece of a
    faded pencil stroke, and may join. A piece that runs out of the digit's surroundings (its size
    around it) is a shadow's edge or a line, not a stroke; and if the digit would grow to over 1.6 times
    its size, nothing joins.
    The digit's size is that of its box, or `size` if larger: in a row, the row's digit height. A digit
    that faded to a scrap (the bar of a 7 whose stem is a line of dashes) is then judged by the digit it
    was, not by the scrap: its stem's dashes are near enough, and within its surroundings."""
    mine = pixels_of(group)
    top, left, bottom, right = _union([p["box"] for p in group])
    size = int(max(bottom - top, right - left, size))
    window = (slice(max(0, top - size), bottom + size), slice(max(0, left - size), right + size))
    near, seed = np.nan_to_num(contrast[window]), mine[window]
    found = group[0]["labels"][window]
    others = [p["label"] for p in kept if p not in group]
    bigger = np.bincount(found.ravel())[found] > seed.sum()
    stays_out = (np.isin(found, others) | bigger) & (found > 0) & ~seed
    judged = ndimage.binary_dilation(stays_out, iterations=2)  # with their rims
    digit_ink = float(np.percentile(near[seed], 90))
    faint = (near > max(paper_grain(contrast), 0.1 * digit_ink)) & ~judged
    labels, n = ndimage.label(faint, structure=np.ones((3, 3)))
    index = np.arange(1, n + 1)
    stroke = np.concatenate([[False], (ndimage.maximum(near, labels, index) >= FAINT_STROKE * digit_ink) &
                             (np.bincount(labels.ravel(), minlength=n + 1)[1:] >= max(3, 0.02 * seed.sum()))])
    stroke[np.concatenate(_frame_sides(labels))] = False  # runs out of the window
    grown = seed
    for _ in range(8):
        close = ndimage.maximum_filter(grown, size=2 * max(1, round(0.15 * size)) + 1)  # a square around it
        joining = np.unique(labels[close])
        more = grown | np.isin(labels, joining[stroke[joining]])
        if more.sum() == grown.sum():
            break
        grown = more
    rows, cols = np.nonzero(grown)
    if max(np.ptp(rows), np.ptp(cols)) + 1 > 1.6 * size:
        return mine
    mine[window] = grown
    return mine


# --- 6. straighten, stroke width, and MNIST's layout ---------------------------------------------------
def cut_out(mine: np.ndarray, contrast: np.ndarray, angle: float | None) -> np.ndarray:
    """The digit's ink cropped to its box, as soft values in [0, 1] (the contrast of its pixels `mine`, a
    mask that is not empty, their anti-aliased edges included), turned upright if the paper's lines gave
    the page's angle."""
    rows, cols = np.nonzero(mine)
    top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
    pad = 2
    window = (slice(max(0, top - pad), bottom + pad), slice(max(0, left - pad), right + pad))
    mine = mine[window]
    if min(bottom - top, right - left) >= 40:
        mine = ndimage.binary_dilation(mine)  # keep the soft rim around each stroke (a small digit's holes stay)
    ink = np.where(mine, contrast[window], 0).astype(np.float32)
    ink = np.clip(ink / max(float(np.percentile(ink[ink > 0], 90)), 1e-3), 0, 1) if (ink > 0).any() else ink
    if angle:  # the page was turned: turn the digit back (lines across the page are level again)
        ink = ndimage.rotate(ink, angle, order=1, reshape=True)
    rows, cols = np.nonzero(ink > 0.25)
    if rows.size == 0:
        return ink
    return np.clip(ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1], 0, 1)


def normalise_strokes(ink: np.ndarray) -> np.ndarray:
    """Thicken strokes that, fitted into 20x20, would be under THIN_PEN (3/4) of MNIST's width (a thin
    pen, a hairline) to about MNIST's; other strokes are left as written.

    The width is measured by `stroke_width`. A digit under 40 px is left as it is: a pixel more or
    less would change it too much, and there is nothing to measure.
    Why only thin strokes, and never thinned: growing a stroke by whole pixels also closes a small
    loop, and thinning a marker's strokes (MNIST has fat ones too) hollowed out filled loops and cut
    joints; without thinning, the USPS and phone-style photos were read 0.2-0.5 points better. Why 3/4
    and not 1/2 (hairlines only): a fine-liner's digits, between the two, were read worse than MNIST-wide
    ones; from 3/4, 11 more of 900 rows of two photo generators were read right by the MLP, 4 more by
    the photo model, and as many single photos or a few more.
    """
    if max(ink.shape) < 40:
        return ink
    mask = ink > 0.5
    if not mask.any():
        return ink
    width = stroke_width(mask)
    target = MNIST_STROKE * max(ink.shape)
    if width >= THIN_PEN * target:
        return ink
    grow = int(round((target - width) / 2))  # each step widens a stroke by 2 px (>= 1: target >= 5 px at 40 px)
    # A disk grows a curve by the same amount in every direction (a square, more diagonally).
    disk = np.hypot(*np.mgrid[-grow:grow + 1, -grow:grow + 1]) <= grow + 0.5
    return ndimage.grey_dilation(np.pad(ink, grow), footprint=disk)


def find_page(image, stages: dict) -> tuple[np.ndarray, float | None]:
    """Steps 1-4, shared by one digit and a row: grey -> contrast -> no desk or frame's edge -> no lines
    or dots.
    Returns the contrast and the page's angle (see `remove_lines`)."""
    grey = shrink(load_image(image, draft=WORK_SIDE))
    stages["grey, small"] = grey
    wide, inverted = flatten_light(grey)
    contrast, _ = flatten_light(grey, paper_window(wide), inverted)
    stages["light flattened" + (" (light ink)" if inverted else "")] = contrast
    if not inverted:  # (a board's light ink has no paper around it)
        contrast = np.where(off_the_paper(grey), np.nan, contrast)
    contrast = drop_frame_edge(contrast, wide)
    stages["desk, frame's edge dropped"] = np.nan_to_num(contrast)
    contrast, angle = remove_lines(contrast)
    contrast = remove_dots(contrast)
    stages["lines removed"] = contrast
    return contrast, angle


def find_parts(image, contrast: np.ndarray, stages: dict, row: bool = False) -> list[dict]:
    """Step 5, first half: the pieces of ink in the contrast (`image` only names the photo in the error).
    A row's ink is found without `find_ink`'s `faint` level: there, faint ink joined neighbouring digits.
    Raises ImageError if there are none."""
    mask = find_ink(contrast, faint=not row)
    stages["ink"] = mask.astype(np.float32)
    parts = ink_parts(mask, contrast)
    if not parts:
        raise ImageError(f"no digit found in {_image_name(image)}: no handwriting stands out from the paper (only "
                         "lines, shadows or the page's edge). Photograph the digit larger, darker, or closer.")
    return parts


def one_digit(image, parts: list[dict], contrast: np.ndarray, angle: float | None, stages: dict) -> np.ndarray:
    """The rest of step 5, and step 6, for one digit: keep the main group of strokes, cut it out, strokes
    like MNIST's, 28x28.
    Raises ImageError if that group is no digit (`looks_like_a_digit`); `image` names the photo there."""
    parts = pieces_on_the_page(parts, stages["grey, small"])
    mine = with_faint_strokes(keep_digit(parts), contrast, parts)
    if not looks_like_a_digit(mine, contrast):
        raise ImageError(f"no digit found in {_image_name(image)}: what stands out from the paper is a speck, "
                         "straight lines or grain, not handwriting. Photograph the digit larger, darker, or closer.")
    ink = cut_out(mine, contrast, angle)
    stages["digit"] = ink
    ink = normalise_strokes(ink)
    stages["strokes like MNIST's"] = ink
    result = fit_28x28(ink)
    stages["28x28 input"] = result
    return result


def preprocess(image, steps: bool = False):
    """A photo of one handwritten digit -> (28, 28) float32, ink 1 on background 0, MNIST's layout.

    Args:
      image: a path, a PIL image, or an array (H, W), (H, W, 3) or (H, W, 4).
      steps: also return {stage name: image} in order, for `predict --show`.
    Raises:
      ImageError: unreadable image, or no digit found.
    """
    stages = {}
    contrast, angle = find_page(image, stages)
    result = one_digit(image, find_parts(image, contrast, stages), contrast, angle, stages)
    return (result, stages) if steps else result


def group_digits(parts: list[dict], contrast: np.ndarray | None = None) -> list[list[dict]]:
    """Pieces of ink in a row -> digits, left to right: pieces that overlap sideways are one digit
    (the flag of a 5 above its body, the two strokes of a 4), and so are neighbouring pieces one above the
    other (`_one_above_the_other`). Digits written on one line are about
    equally tall, so a group under half the row's typical height (a speck, a scrap of a line or of the
    table's edge) or over three times it (a margin line down the page) is not a digit and is left out.
    Given the `contrast`, a short group is first grown by its faint strokes (`with_faint_strokes`): a
    thin pen's digit that faded to pieces is a short scrap until they rejoin it."""
    height = np.median([p["box"][2] - p["box"][0] for p in parts])
    # Only pieces on the row's line: their vertical middle near the middle of the tall pieces' ink (a
    # median weighted by area, so that many scraps, such as a broken margin line, do not outvote digits).
    tall = [p for p in parts if p["box"][2] - p["box"][0] >= 0.5 * height]
    middle = _ink_median(tall, [(p["box"][0] + p["box"][2]) / 2 for p in tall])
    parts = [p for p in parts if p["box"][0] - height < middle < p["box"][2] + height]
    # A long, low piece (wider than TOUCHING times the typical height, shorter than 0.8 of it and over three
    # times as wide as it is tall) is a scrap of a line that was not all taken out (in a shadow, at the frame),
    # not touching digits: those are about as tall as digits, and two of them no more than twice as wide.
    def long_and_low(p):
        top, left, bottom, right = p["box"]
        return right - left > max(TOUCHING * height, 3 * (bottom - top)) and bottom - top < 0.8 * height

    parts = [p for p in parts if not long_and_low(p)] or parts
    # A piece whose box holds the middles of two or more other pieces is drawn around them (the edge of a
    # sticky note or of the page, even where not closed), not a digit: a 0 holds a scrap at most.
    parts = [p for p in parts if sum(_holds(p["box"], q["box"]) for q in parts if q is not p) < 2] or parts
    groups = _halves_of_a_ring(_one_above_the_other(_side_by_side(parts, height=height)))
    heights = [_height(g) for g in groups]
    typical = np.median(heights)
    if contrast is not None:
        heights = [h if h >= 0.5 * typical else
                   int(np.ptp(np.nonzero(with_faint_strokes(g, contrast, parts, typical))[0]) + 1)
                   for g, h in zip(groups, heights)]
    return [g for g, h in zip(groups, heights) if 0.5 * typical <= h <= 3 * typical]


def _one_above_the_other(groups: list[list[dict]]) -> list[list[dict]]:
    """Neighbouring groups that lie one above the other are one digit: a row's digits stand side by side, so
    these are the pieces of a stroke that faded in the middle (a 1 in two pieces, the stem of a 6 above its
    loop), which need not share half their width. Each must be a real piece (a fifth of the row's typical
    height), they must nearly touch sideways, and together be no taller than a digit (1.5 x typical)."""
    typical = np.median([_height(g) for g in groups])
    merged = []
    for g in groups:
        if merged:
            a, b = _union([p["box"] for p in merged[-1]]), _union([p["box"] for p in g])
            stacked = _shared_rows(a, b) <= 0.2 * min(a[2] - a[0], b[2] - b[0])
            if (stacked and min(a[2] - a[0], b[2] - b[0]) >= 0.2 * typical
                    and _shared_columns(a, b) >= -0.1 * typical and max(a[2], b[2]) - min(a[0], b[0]) <= 1.5 * typical):
                merged[-1] = merged[-1] + g
                continue
        merged.append(g)
    return merged


def _bulge(group: list[dict]) -> float:
    """How far (px) the middle third of a group's ink lies right of the midpoint of its top and bottom
    thirds' ink: < 0 for a '(', > 0 for a ')', about 0 for a straight stroke (a 1, slanted or not)."""
    top, left, bottom, right = _union([p["box"] for p in group])
    rows, cols = np.nonzero(pixels_of(group)[top:bottom, left:right])
    third = np.minimum(3 * rows // (bottom - top), 2)  # 0, 1, 2: the top, middle and bottom third
    if len(np.unique(third)) < 3:
        return 0.0
    upper, middle, lower = (cols[third == k].mean() for k in range(3))
    return float(middle - (upper + lower) / 2)


def _halves_of_a_ring(groups: list[list[dict]]) -> list[list[dict]]:
    """Neighbouring groups that are the two halves of a 0 are one digit: a faint 0 whose top and bottom
    faded comes out as a '(' and a ')', side by side over the same rows, each under half the row's typical
    height wide, close enough to share a fifth of their width, and bulging away from each other (two 1s
    are straight)."""
    typical = np.median([_height(g) for g in groups])
    merged = []
    for g in groups:
        if merged:
            a, b = _union([p["box"] for p in merged[-1]]), _union([p["box"] for p in g])
            narrow = max(a[3] - a[1], b[3] - b[1]) <= 0.5 * typical
            shared_rows = _shared_rows(a, b) >= 0.6 * min(a[2] - a[0], b[2] - b[0])
            close = _shared_columns(a, b) >= 0.2 * min(a[3] - a[1], b[3] - b[1])
            if (narrow and shared_rows and close
                    and _bulge(merged[-1]) < -0.03 * typical and _bulge(g) > 0.03 * typical):  # ( and )
                merged[-1] = merged[-1] + g
                continue
        merged.append(g)
    return merged


def _side_by_side(parts: list[dict], share: float = 0.5, height: float | None = None) -> list[list[dict]]:
    """Pieces grouped left to right: a piece that overlaps the group before it sideways by more than
    `share` of the narrower one's width joins that group, unless, given the row's typical piece `height`,
    it was written apart from a piece of the group (`_written_apart`)."""
    groups = []
    for p in sorted(parts, key=lambda p: p["box"][1]):
        if groups:
            box = _union([q["box"] for q in groups[-1]])
            overlap = _shared_columns(box, p["box"])
            if (overlap > share * min(box[3] - box[1], p["box"][3] - p["box"][1])
                    and not (height and any(_written_apart(q, p, height) for q in groups[-1]))):
                groups[-1].append(p)
                continue
        groups.append([p])
    return groups


def _written_apart(a: dict, b: dict, height: float) -> bool:
    """Are two pieces two digits written close together, not two strokes of one digit? Both are nearly as
    tall as the row's typical piece (0.8 of `height`), they have ink in the same rows (0.8 of the shorter
    one's), and in each of those rows the same piece's ink ends before the other's begins. A slanted 1 written close
    after a 3 shares most of its width with the 3's box, and "31" was one digit. (A 4's two strokes meet
    at its bar, so the bar's rows are shared; a 5's flag is short.)"""
    (a_top, a_left, a_bottom, a_right), (b_top, b_left, b_bottom, b_right) = a["box"], b["box"]
    shorter = min(a_bottom - a_top, b_bottom - b_top)
    if shorter < 0.8 * height or _shared_rows(a["box"], b["box"]) < 0.8 * shorter:
        return False
    top, bottom = max(a_top, b_top), min(a_bottom, b_bottom)
    left = min(a_left, b_left)
    window = a["labels"][top:bottom, left:max(a_right, b_right)]
    columns = np.arange(window.shape[1])
    ink_a, ink_b = window == a["label"], window == b["label"]
    both = ink_a.any(axis=1) & ink_b.any(axis=1)  # the rows where both have ink
    if both.sum() < 0.8 * shorter:
        return False
    first = lambda ink: np.where(ink, columns, window.shape[1]).min(axis=1)[both]  # each row's leftmost ink
    last = lambda ink: np.where(ink, columns, -1).max(axis=1)[both]               # and rightmost
    return bool((last(ink_a) < first(ink_b)).all() or (last(ink_b) < first(ink_a)).all())


def on_the_page(groups: list[list[dict]], grey: np.ndarray, typical: float | None = None) -> list[list[dict]]:
    """The groups of pieces that lie on the page, not on the dark table beyond its edge.

    Every digit's box has something bright in it: the paper around dark ink, or light ink itself. So the
    brightest tenth of each box (in the photo's grey) is compared with `typical`, the brightness a digit's
    box should reach: a box under ON_THE_TABLE of it holds only the table's grain. For a row, `typical` is
    the groups' median; for one digit, the photo's own brightest tenth (mostly paper). A shadow or a
    gradient darkens a digit's paper too, but less: in our shadowed test photos the paper keeps 0.4 of
    its light. (A table that the frame cuts is dropped earlier, in `ink_parts`; this is for a table seen
    through a gap, or its corner.)"""
    if typical is None and len(groups) < 2:
        return groups  # a row of one: nothing to compare it with
    brightest = [float(np.percentile(grey[top:bottom, left:right], 90))
                 for top, left, bottom, right in (_union([p["box"] for p in g]) for g in groups)]
    typical = float(np.median(brightest)) if typical is None else typical
    return [g for g, b in zip(groups, brightest) if b >= ON_THE_TABLE * typical] or groups


def off_the_page_edge(groups: list[list[dict]], grey: np.ndarray) -> list[list[dict]]:
    """A row's groups without a scrap of the page's edge, or of the desk beyond it, at either end. Where
    the paper meets a dark desk, the page's edge is a thin dark line, and the desk's grain beside it is
    dark too: a scrap of them beside the row was read as one more 1 ("5915" as "15915"). Such a scrap
    has the desk beyond it: the photo from it outwards to the frame's edge is mostly under half as
    bright as the paper. And either it lies on the desk itself: the photo around its ink, in its box,
    is under ON_THE_TABLE of the row's paper (around the other digits' ink; a shadow leaves the paper
    more of its light). Or it is the edge's line: thin (under EDGE_SLIVER of the row's typical height
    wide, or one straight stroke: a turned page's edge slants), with the desk right beyond it (within
    15% of the typical height), judged against the paper just beside it on the row's side where that
    is darker (a shadow over the row's end darkens the paper and what lies beyond alike). A 1 at the
    end of a row has paper beyond it (a margin line is dark, but thin)."""
    if len(groups) < 2:
        return groups
    typical = float(np.median([_height(g) for g in groups]))
    band = max(2, round(0.15 * typical))
    boxes = [_union([p["box"] for p in g]) for g in groups]
    inks = [np.isin(g[0]["labels"][t:b, l:r], [p["label"] for p in g]) for g, (t, l, b, r) in zip(groups, boxes)]
    papers = [float(np.median(grey[t:b, l:r][~ink] if (~ink).any() else grey[t:b, l:r]))  # around the ink
              for ink, (t, l, b, r) in zip(inks, boxes)]

    def on_the_edge(i: int, outwards_left: bool) -> bool:
        top, left, bottom, right = boxes[i]
        row_paper = float(np.median(papers[:i] + papers[i + 1:]))
        beyond = grey[top:bottom, :left] if outwards_left else grey[top:bottom, right:]
        if papers[i] < ON_THE_TABLE * row_paper and (not beyond.size or np.median(beyond) < 0.5 * row_paper):
            return True  # on the desk
        towards = grey[top:bottom, right:right + band] if outwards_left else grey[top:bottom, max(0, left - band):left]
        paper = min(row_paper, float(np.median(towards))) if towards.size else row_paper
        near = beyond[:, -band:] if outwards_left else beyond[:, :band]
        if not near.size or np.median(beyond) >= 0.5 * paper or np.median(near, axis=0).min() >= 0.5 * paper:
            return False
        return right - left <= EDGE_SLIVER * typical or _straight_stroke(*np.nonzero(inks[i]))[0]

    ends = [i for i, outwards_left in ((0, True), (len(groups) - 1, False)) if on_the_edge(i, outwards_left)]
    return [g for i, g in enumerate(groups) if i not in ends] or groups


def on_the_line(groups: list[list[dict]]) -> list[list[dict]]:
    """A row's groups without the one that lies off the row's line: a scrap of a grid line's crossing or
    of a shadow's edge below or above the row was read as one more digit ("10021" as "100214"). A row's
    digits stand on one line, which may slant: the group whose middle lies furthest from the straight
    line through the other groups' middles is left out if that is more than OFF_THE_LINE of the row's
    typical height. Only with three others or more, to draw the line through."""
    if len(groups) < 4:
        return groups
    boxes = np.array([_union([p["box"] for p in g]) for g in groups], float)
    typical = np.median(boxes[:, 2] - boxes[:, 0])
    middle_row, middle_column = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    off = []
    for i in range(len(groups)):
        others = np.arange(len(groups)) != i
        if np.ptp(middle_column[others]) > 0:
            slope, level = np.polyfit(middle_column[others], middle_row[others], 1)
        else:  # (all in one column: no slant to fit)
            slope, level = 0.0, float(np.median(middle_row[others]))
        off.append(abs(middle_row[i] - (slope * middle_column[i] + level)))
    worst = int(np.argmax(off))
    return [g for i, g in enumerate(groups) if i != worst] if off[worst] > OFF_THE_LINE * typical else groups


def pieces_on_the_page(parts: list[dict], grey: np.ndarray) -> list[dict]:
    """The pieces of ink that lie on the page (`on_the_page`, each piece judged alone against the photo's
    brightest tenth, mostly paper): the grain of a dark table is no digit's stroke."""
    return [g[0] for g in on_the_page([[p] for p in parts], grey, float(np.percentile(grey, 90)))]


def _holds(box, other) -> bool:
    """Is the middle of box `other` inside `box`? (Both (top, left, bottom, right).)"""
    row, col = (other[0] + other[2]) / 2, (other[1] + other[3]) / 2
    return box[0] < row < box[2] and box[1] < col < box[3]


def _ink_median(parts: list[dict], values: list[float]) -> float:
    """The median of one value per piece, each piece counted once per pixel of ink it has."""
    order = np.argsort(values)
    weight = np.cumsum([parts[i]["area"] for i in order])
    return float(np.asarray(values)[order[np.searchsorted(weight, weight[-1] / 2)]])


def _height(group: list[dict]) -> int:
    """The height of the box around a group of pieces."""
    top, _, bottom, _ = _union([p["box"] for p in group])
    return bottom - top


def _one_wide_ring(mask: np.ndarray) -> bool:
    """Is this piece of ink (a mask cut to its box) one ring around a hole of at least RING of its width,
    in its middle: a 0 written wide? Nearly all of its ink (90%) must lie within a stroke's width of the
    hole. Touching digits are not: a touching 30's ring is half of it and at one end, and where two digits
    close a hole between them, the rest of their strokes lie away from it."""
    holes, _ = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    w = mask.shape[1]
    reach = 1.5 * stroke_width(mask) + 1
    for i, hole in enumerate(ndimage.find_objects(holes), start=1):
        left, right = hole[1].start, hole[1].stop
        if right - left >= RING * w and abs((left + right) / 2 - w / 2) <= w / 6:
            near = ndimage.distance_transform_edt(holes != i) <= reach
            if (mask & near).sum() >= 0.9 * mask.sum():
                return True
    return False


def split_wide(ink: np.ndarray, height: float) -> list[np.ndarray]:
    """A piece much wider than a digit is tall (TOUCHING times the row's `height`) is touching digits: cut it
    at the emptiest columns, into as many digits as DIGIT_WIDTH says fit. A single 0 or 2 may be written as
    wide as it is tall, and a little taller than the row's typical digit; and a 0 may be written wider
    still: a piece that is one ring around a hole of most of its width (RING) is not cut."""
    h, w = ink.shape
    count = int(round(w / (DIGIT_WIDTH * height)))  # (at least 2 once w reaches TOUCHING * height)
    if count < 2 or w < TOUCHING * height:
        return [ink]
    if _one_wide_ring(ink > 0.5):
        return [ink]
    columns = ndimage.uniform_filter1d(ink.sum(axis=0), 3)
    cuts = []
    for k in range(1, count):  # look for the valley near each expected boundary
        lo, hi = int(w * (k - 0.35) / count), int(w * (k + 0.35) / count)
        cuts.append(lo + int(np.argmin(columns[lo:max(hi, lo + 1)])))  # (a piece 1-2 px tall: a window of 0)
    pieces = [ink[:, a:b] for a, b in zip([0] + cuts, cuts + [w])]
    out = []
    for piece in pieces:
        rows, cols = np.nonzero(piece > 0.5)
        if rows.size:
            out.append(piece[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
    return out


def fainter_digits(groups: list[list[dict]], known: np.ndarray, contrast: np.ndarray) -> np.ndarray:
    """The ink of digits in a row written with a lighter or thinner pen than the boldest (mask, maybe empty).

    A row's ink is judged against its boldest digit, and a digit under half its contrast was not ink at
    all: the row lost it. Such a digit is looked for again at FAINT_DIGIT of the boldest contrast, and
    kept only if it looks like one of the row's digits: a piece of new ink (`known` is the ink found
    already), about as tall as the others (a long scrap of a grid line in a shadow is taller, a dash
    shorter), its middle on the row's line, beside the digits found (not over them), within a digit's
    height of them (at two heights, a stripe of a wooden desk came in), and not cut by the frame.
    (Judging each digit against the ink near it instead turned scraps of grid lines into digits.)"""
    if not groups:
        return np.zeros(contrast.shape, bool)
    boxes = [_union([p["box"] for p in g]) for g in groups]
    height = float(np.median([b[2] - b[0] for b in boxes]))
    line_top, line_bottom = np.median([b[0] for b in boxes]), np.median([b[2] for b in boxes])
    labels, _ = ndimage.label(find_ink(contrast, faint=False, level=FAINT_DIGIT), structure=np.ones((3, 3)))
    h, w = contrast.shape
    new = []  # pieces of new ink, not cut by the frame, beside the digits found
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        top, left, bottom, right = box[0].start, box[1].start, box[0].stop, box[1].stop
        if (known[box] & (labels[box] == i)).any() or top == 0 or left == 0 or bottom == h or right == w:
            continue
        if all(min(right, b[3]) <= max(left, b[1]) for b in boxes):
            new.append(dict(label=i, box=(top, left, bottom, right)))
    digits = []  # the labels of the new pieces that make digits
    for group in _side_by_side(new, share=0):  # a faint stroke fades in places: its pieces make one digit
        top, left, bottom, right = _union([p["box"] for p in group])
        gap = min(min(abs(left - b[3]), abs(b[1] - right)) for b in boxes)
        if (gap <= height and 0.5 * height <= bottom - top <= 1.5 * height
                and line_top < (top + bottom) / 2 < line_bottom):
            digits += [p["label"] for p in group]
    return np.isin(labels, digits)


def _grew_into_one(a: tuple, b: tuple, height: float) -> bool:
    """Are two neighbouring groups of a row, each with its faint strokes grown (group, mask), one digit?
    Two scraps of one faded digit (the ends of a thin pen's 2) each grow into the whole digit: they are,
    if both are short (under half the row's `height`) and their masks meet. A scrap beside a whole digit
    is, if their masks meet and together they are under a quarter of the row's height wider than the
    digit's own ink (a scrap of a grid line at the edge of a faint 0); a faded 7 written close after a 1
    is a whole digit wider."""
    (group_a, mask_a), (group_b, mask_b) = a, b
    short_a, short_b = _height(group_a) < 0.5 * height, _height(group_b) < 0.5 * height
    if not (short_a or short_b) or not (mask_a & mask_b).any():
        return False
    if short_a and short_b:
        return True
    _, left, _, right = _union([p["box"] for p in (group_b if short_a else group_a)])  # the whole digit's ink
    columns = np.nonzero((mask_a | mask_b).any(axis=0))[0]
    return columns.max() + 1 - columns.min() <= right - left + 0.25 * height


def digits_in_a_row(parts: list[dict], contrast: np.ndarray, angle: float | None, stages: dict):
    """The rest of step 5, and step 6, for a row: the pieces grouped into digits left to right, each cut out
    and fitted to 28x28.
    Returns ([28x28 arrays], [boxes (top, left, bottom, right) in the shrunk photo's pixels])."""
    digits, boxes = [], []
    grey = stages["grey, small"]
    # The table's grain goes before the row's line is found: a wide table has more ink than the row.
    parts = pieces_on_the_page(parts, grey)
    groups = on_the_page(group_digits(parts, contrast), grey)
    kept = np.isin(parts[0]["labels"], [p["label"] for g in groups for p in g])
    fainter = fainter_digits(groups, kept, contrast)
    if fainter.any():
        mask = (parts[0]["labels"] > 0) | fainter
        stages["ink"] = mask.astype(np.float32)
        parts = pieces_on_the_page(ink_parts(mask, contrast), grey)
        groups = on_the_page(group_digits(parts, contrast), grey)
    groups = on_the_line(off_the_page_edge(groups, grey))
    height = np.median([_height(g) for g in groups]) if groups else 0.0
    grown = []  # (group, its pixels with its faint strokes), left to right
    for group in groups:
        mine = with_faint_strokes(group, contrast, parts, height)
        if grown and _grew_into_one(grown[-1], (group, mine), height):
            previous, previous_mine = grown.pop()
            group, mine = previous + group, previous_mine | mine
        grown.append((group, mine))
    grown = [(group, mine) for group, mine in grown if looks_like_a_digit(mine, contrast)]
    for group, mine in grown:
        ink = cut_out(mine, contrast, angle)
        pieces = split_wide(ink, height)
        if len(pieces) > 1:  # faint strokes never make one digit two: a grid's scraps had widened a 4
            alone = split_wide(cut_out(pixels_of(group), contrast, angle), height)
            pieces = alone if len(alone) == 1 else pieces
        for piece in pieces:
            digits.append(fit_28x28(normalise_strokes(piece)))
        boxes.append(_union([p["box"] for p in group]))
    found = grey.copy()
    for top, left, bottom, right in boxes:  # each digit's box, drawn in black on the photo
        found[top:bottom, [left, right - 1]] = 0
        found[[top, bottom - 1], left:right] = 0
    stages["digits found"] = found
    stages["28x28 inputs"] = np.concatenate(digits, axis=1) if digits else np.zeros((28, 28))
    return digits, boxes


def split_digits(image, steps: bool = False):
    """A photo of digits written left to right on one line -> ([28x28 arrays], [boxes]) left to right.

    Boxes are (top, left, bottom, right) in the shrunk photo's pixels (`steps["grey, small"]`).
    Raises ImageError when no digit is found.
    """
    stages = {}
    contrast, angle = find_page(image, stages)
    digits, boxes = digits_in_a_row(find_parts(image, contrast, stages, row=True), contrast, angle, stages)
    if not digits:
        raise ImageError(f"no digit found in {_image_name(image)}: the ink found is too faint or too small to "
                         "be digits. Photograph the digits larger, darker, or closer.")
    return (digits, boxes, stages) if steps else (digits, boxes)


def _model(params) -> Model:
    if params is None or isinstance(params, (str, os.PathLike)):
        return load_params(params)
    return params


_predict_jit = jax.jit(predict)  # compiled once per network


def probabilities(model: Model, digits28: np.ndarray) -> np.ndarray:
    """The ten probabilities (digit 0 first) of each prepared 28x28 image (N, 28, 28) or one (28, 28)."""
    x = np.asarray(digits28, np.float32).reshape(-1, 784)
    out = np.exp(np.asarray(_predict_jit(model, x), np.float64))
    return out[0] if np.ndim(digits28) == 2 else out


def predict_probabilities(image, params: Model | str | None = None) -> np.ndarray:
    """The ten probabilities (digit 0 first) that `image` shows each digit.

    Args:
      image: a path, a PIL image, or an array; any size, dark-on-light or light-on-dark.
      params: a Model from `load_params`, or the path of a params.npz; default: the last run's
        (runs/latest/params.npz).
    """
    return probabilities(_model(params), preprocess(image))


def predict_digit(image, params: Model | str | None = None) -> int:
    """The digit (0-9) that `image` most probably shows. Arguments as for `predict_probabilities`."""
    return int(np.argmax(predict_probabilities(image, params)))


def read_number(image, params: Model | str | None = None) -> str:
    """The digits written left to right on one line in `image`, as a string ("2026"); one digit works too.

    Args:
      image: a path, a PIL image, or an array.
      params: as for `predict_probabilities` (default: the last run's model).
    Raises:
      ImageError: unreadable, or no digit found.
    """
    digits, _ = split_digits(image)
    return digits_read(_model(params), digits)


def digits_read(model: Model, digits28: list[np.ndarray]) -> str:
    """The prepared 28x28 digits of a row, read left to right, as a string."""
    return "".join(str(int(d)) for d in probabilities(model, np.stack(digits28)).argmax(axis=1))


# =============================================================================
# 6. Plots (matplotlib, written as PNG files; no window is opened)
# =============================================================================

NO_MATPLOTLIB = ("matplotlib is not installed, and the plots need it: `pip install -r requirements.txt`, "
                 "or train with --no-plots.")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError(NO_MATPLOTLIB) from None
    matplotlib.use("Agg")  # draw into files, so that it works without a display
    import matplotlib.pyplot as plt
    return plt


def _import_pyplot_meanwhile() -> threading.Thread:
    """Import matplotlib in a thread (0.3-0.5 s) while XLA compiles the epoch on one core, so that the
    plots after training do not wait for it; join the thread before plotting. A failed import is left
    to save_plots, which imports again and says what failed."""
    def load():
        try:
            _pyplot()
        except Exception:  # save_plots reports it
            pass
    thread = threading.Thread(target=load)
    thread.start()
    return thread


def _save_figure(plt, fig, path: Path) -> Path:
    # Margins are set where each figure is made, not by bbox_inches="tight": that draws every figure
    # twice, a third of the plots' time (0.3 s of 0.9 s for the four after training).
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


PLOT_FILES = ("curves.png", "predictions.png", "confusion.png", "first_layer.png")


def save_plots(folder: Path, run: Run, data: Dataset) -> list[Path]:
    """Write the PLOT_FILES into `folder`."""
    plt = _pyplot()
    folder = Path(folder)
    written = []

    # Loss and accuracy per epoch, and the learning rate per step.
    epochs = [r["epoch"] for r in run.epochs]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.91, wspace=0.28)
    ax_loss.plot(epochs, [r["train_loss"] for r in run.epochs], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in run.epochs], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss (mean NLL, nats)", title="Loss", yscale="log")
    ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in run.epochs], "o-", label="train")
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in run.epochs], "o-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_lr.plot(run.learning_rates)
    ax_lr.set(xlabel="step", ylabel="learning rate", title="Learning rate per step")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    written.append(_save_figure(plt, fig, folder / "curves.png"))

    # A grid of test digits: the first mistakes, then correct ones, with predicted and true labels.
    predicted, labels = run.predicted, data.test_labels
    wrong = np.nonzero(predicted != labels)[0][:16]
    shown = np.concatenate([wrong, np.nonzero(predicted == labels)[0][:48 - len(wrong)]])
    fig, ax = plt.subplots(figsize=(9, 7.5))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92)
    ax.imshow(mosaic(data.test_images[shown] / 255, cols=8, gap=10), cmap="gray_r", vmin=0, vmax=1)
    for n, i in enumerate(shown):  # one picture with 48 labels draws far faster than 48 pictures
        ok = predicted[i] == labels[i]
        ax.text((n % 8) * 38 + 14, (n // 8) * 38 - 1, f"{predicted[i]}" + ("" if ok else f" (true {labels[i]})"),
                ha="center", va="bottom", fontsize=9, color="black" if ok else "red",
                fontweight="normal" if ok else "bold")
    ax.set_ylim(6 * 38 - 10, -12)
    ax.axis("off")
    fig.suptitle(f"Test digits: predicted label above each; mistakes in red ({int((predicted != labels).sum())} "
                 f"of {len(labels):,} wrong)")
    written.append(_save_figure(plt, fig, folder / "predictions.png"))

    # Confusion matrix.
    confusion = np.array(classification_report(labels, predicted)["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(7, 6))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.1, top=0.93)
    shown = ax.imshow(np.log1p(confusion), cmap="Blues")
    for t in range(10):
        for p in range(10):
            if confusion[t, p]:
                ax.text(p, t, confusion[t, p], ha="center", va="center", fontsize=8,
                        color="white" if confusion[t, p] > confusion.max() / 4 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit",
           title=f"Confusion matrix, {len(labels):,} test images (colour: log count)")
    fig.colorbar(shown, ax=ax, label="log(1 + count)")
    written.append(_save_figure(plt, fig, folder / "confusion.png"))

    # What the first layer learned: each hidden unit's 784 input weights as a 28x28 picture, or the
    # convolution's kernels.
    (key, w), = [(k, v) for k, v in run.model.params[first_weights(run.model)].items() if k in ("W", "K")]
    w = np.asarray(w)
    if key == "W":
        tiles, title = w[:64].reshape(-1, 28, 28), "First layer: input weights of 64 hidden units as 28x28 images"
    else:
        k = int(round(np.sqrt(w.shape[0])))
        tiles, title = w.T.reshape(-1, k, k)[:100], f"First layer: the {w.shape[-1]} convolution kernels ({k}x{k})"
    limit = float(np.percentile(np.abs(tiles), 99.5))  # a few extreme weights would wash out the rest
    fig, ax = plt.subplots(figsize=(8, 7.2))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.94)
    picture = ax.imshow(mosaic(tiles, cols=int(np.ceil(np.sqrt(len(tiles)))), gap=1), cmap="RdBu_r", vmin=-limit,
                        vmax=limit, interpolation="nearest")
    ax.axis("off")
    fig.colorbar(picture, ax=ax, shrink=0.6, extend="both", label="weight (red +, blue -)")
    ax.set_title(title)
    written.append(_save_figure(plt, fig, folder / "first_layer.png"))
    return written


def mosaic(tiles: np.ndarray, cols: int, gap: int) -> np.ndarray:
    """Images (N, h, w) side by side in rows of `cols`, `gap` blank (NaN) pixels apart: one picture."""
    n, h, w = tiles.shape
    out = np.full((-(-n // cols) * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out


def first_weights(model: Model) -> int:
    """The index of the first layer with weights (a Dense or Conv)."""
    return next(i for i, p in enumerate(model.params) if isinstance(p, dict) and ({"W", "K"} & p.keys()))


def save_steps_figure(path: Path, image_name: str, steps: dict, probs: np.ndarray | None = None,
                      number: str | None = None) -> Path:
    """One image's preprocessing steps side by side, and its ten probabilities (or the number read)."""
    plt = _pyplot()
    panels = len(steps) + (probs is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3 * panels, 3.4), layout="constrained")
    for ax, (name, picture) in zip(axes, steps.items()):  # grey levels as stored: 0 black, 1 white
        ax.imshow(picture, cmap="gray" if name.startswith(("grey", "digits found")) else "gray_r", vmin=0, vmax=1)
        ax.set_title(f"{name}\n{picture.shape[1]}x{picture.shape[0]}", fontsize=10)
        ax.axis("off")
    if probs is None:
        fig.suptitle(f"{image_name}: read as {number}", fontsize=10)
        return _save_figure(plt, fig, Path(path))
    axes[-1].barh(range(10), probs, color=["tab:red" if d == probs.argmax() else "tab:gray" for d in range(10)])
    axes[-1].set(yticks=range(10), xlim=(0, 1), xlabel="probability", title=f"read as {int(probs.argmax())}")
    axes[-1].invert_yaxis()
    fig.suptitle(str(image_name), fontsize=10)
    return _save_figure(plt, fig, Path(path))


# =============================================================================
# 7. Draw a digit in the browser: python mnist_jax.py serve
# =============================================================================
# A small web server from the standard library: GET / is one page (below) with a
# canvas to draw on; while you draw, the page POSTs the drawing as a PNG to
# /predict, which runs it through the same `preprocess` as `predict_digit` and
# answers with the ten probabilities and the 28x28 image the network saw.

SERVE_MAX_BODY = 2 * 1024 * 1024    # bytes of image a client may send
SERVE_MAX_PIXELS = 24_000_000       # a 24-megapixel photo still fits; a small PNG claiming more does not
SERVE_FORMATS = ("PNG", "JPEG", "WEBP")
SERVE_TIMEOUT = 10.0                # seconds a client may stay silent in the middle of a request
SERVE_DEADLINE = 30.0               # seconds one connection (one request: HTTP/1.0) may last in all
SERVE_MAX_CONNECTIONS = 64          # open at once; more are answered 503 at once
SERVE_PREDICTIONS_AT_ONCE = 2       # a big photo takes ~0.5 GB on its way through preprocess: this many at a time

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Draw a digit · mnist_jax</title>
<style>
  :root { --ink: #1b1b1f; --muted: #4b4b57; --paper: #fff; --back: #f1f1ee; --accent: #0b57d0;
          --bar: #767f90; --error: #a4161a; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         color: var(--ink); background: var(--back); }
  header, main, footer { max-width: 980px; margin: 0 auto; padding: 0 16px; }
  h1 { font-size: 1.45rem; margin: 16px 0 2px; }
  header p, footer p { margin: 0 0 12px; color: var(--muted); }
  main { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; align-items: start; }
  section { background: var(--paper); border-radius: 12px; padding: 16px; box-shadow: 0 1px 3px rgba(0,0,0,.15); }
  #pad { display: block; width: 100%; max-width: 440px; aspect-ratio: 1 / 1; margin: 0 auto; background: #fff;
         border: 2px solid var(--ink); border-radius: 8px; cursor: crosshair; touch-action: none;
         user-select: none; -webkit-user-select: none; -webkit-touch-callout: none; }
  .tools { display: flex; flex-wrap: wrap; gap: 8px; justify-content: center; margin-top: 12px; }
  button, .upload { font: inherit; font-weight: 600; min-height: 44px; padding: 8px 18px; border-radius: 8px;
                    border: 2px solid var(--accent); background: #fff; color: var(--accent); cursor: pointer; }
  button:hover, .upload:hover { background: #e8effc; }
  button:disabled { color: #6b6b75; border-color: #b9b9c2; background: #fff; cursor: default; }
  :focus-visible, #photo:focus-visible + .upload { outline: 3px solid var(--ink); outline-offset: 2px; }
  .hidden-input { position: absolute; width: 1px; height: 1px; opacity: 0; overflow: hidden; }
  .hint { text-align: center; color: var(--muted); margin: 10px 0 0; font-size: .95rem; }
  .answer { display: flex; align-items: center; justify-content: space-between; gap: 16px; flex-wrap: wrap; }
  #digit { font-size: 5.5rem; font-weight: 700; line-height: 1; }
  #confidence { color: var(--muted); }
  figure { margin: 0; text-align: center; }
  #seen { display: block; width: 112px; height: 112px; image-rendering: pixelated; background: #000;
          border-radius: 4px; }
  figcaption { font-size: .85rem; color: var(--muted); max-width: 140px; }
  #number { font-size: 1.3rem; margin: 8px 0 0; }
  #error { color: var(--error); font-weight: 600; min-height: 1.45em; margin: 8px 0 0; }
  #bars { list-style: none; margin: 6px 0 0; padding: 0; }
  #bars li { display: grid; grid-template-columns: 1.4em 1fr 3.6em; gap: 8px; align-items: center; height: 26px; }
  .track { height: 14px; background: #e4e4e9; border-radius: 7px; overflow: hidden; }
  .fill { display: block; height: 100%; width: 0; background: var(--bar); transition: width .12s; }
  #bars li.top { font-weight: 700; }
  #bars li.top .fill { background: var(--accent); }
  .pct { text-align: right; font-variant-numeric: tabular-nums; }
  .why { color: var(--muted); font-size: .95rem; margin: 12px 0 0; }
  @media (max-width: 720px) {  /* a phone: one column, the answer close under the box */
    main { grid-template-columns: minmax(0, 1fr); gap: 10px; } h1 { margin-top: 8px; } header p { display: none; }
    section { padding: 10px; } #pad { max-width: min(440px, 55vh); } .hint { display: none; } }
</style>
</head>
<body>
<header>
  <h1>Draw a digit</h1>
  <p>A network trained on MNIST reads it as you draw: mouse, finger or pen.</p>
</header>
<main>
  <section aria-label="Drawing">
    <canvas id="pad" width="280" height="280" role="img"
            aria-label="Drawing box: draw one digit with the mouse, a finger or a pen"></canvas>
    <div class="tools">
      <button type="button" id="undo" title="Undo the last stroke (Ctrl+Z)">Undo</button>
      <button type="button" id="clear">Clear</button>
      <input type="file" id="photo" class="hidden-input" accept="image/png,image/jpeg,image/webp,image/*">
      <label for="photo" class="upload">Upload a photo</label>
    </div>
    <p class="hint" id="hint">Draw one digit, large, in the box.</p>
    <noscript><p id="noscript">This page needs JavaScript to draw.</p></noscript>
  </section>
  <section aria-label="What the network reads">
    <div class="answer">
      <div>
        <div id="digit" aria-live="polite">?</div>
        <div id="confidence">draw a digit</div>
      </div>
      <figure>
        <img id="seen" width="28" height="28" alt="The 28 by 28 pixel image the network saw">
        <figcaption>What the network saw: 28&times;28 pixels</figcaption>
      </figure>
    </div>
    <p id="number" hidden>Number read: <strong id="number-value"></strong></p>
    <p id="error" role="alert"></p>
    <ol id="bars" aria-label="Probability of each digit"></ol>
    <p class="why">Why the small picture: the network learned from MNIST digits that are cropped, scaled to fit
      20&times;20 pixels and centred in 28&times;28, so your drawing gets the same treatment first; a digit drawn
      small or in a corner would otherwise look like nothing it has seen.</p>
  </section>
</main>
<footer><p id="model">&nbsp;</p></footer>
<script>
"use strict";
const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const SIDE = pad.width;          // 280 canvas pixels; CSS scales the box to the screen
const PEN = SIDE / 18;           // stroke width: about a pen on a sheet of paper
const GAP_MS = 340;              // at most about 3 requests a second while drawing
const MAX_BYTES = 2 * 1024 * 1024;
const $ = id => document.getElementById(id);

let strokes = [];                // each stroke: a list of [x, y] points in canvas pixels
let current = null;              // the stroke being drawn: {id: pointerId, points}
let photo = null;                // an uploaded photo, shown in the box and sent instead of strokes
let version = 0;                 // goes up with every change of the drawing
let dirty = false, busy = false, timer = null, lastSent = -1e9;

// ---- drawing -------------------------------------------------------------------------------------------
function paper() { ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, SIDE, SIDE); }
function pen() { ctx.strokeStyle = ctx.fillStyle = "#000"; ctx.lineWidth = PEN; ctx.lineCap = ctx.lineJoin = "round"; }
function dot([x, y]) { pen(); ctx.beginPath(); ctx.arc(x, y, PEN / 2, 0, 2 * Math.PI); ctx.fill(); }
function segment(a, b) { pen(); ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke(); }
function drawStroke(points) {
  dot(points[0]);
  for (let i = 1; i < points.length; i++) segment(points[i - 1], points[i]);
}
function redraw() { paper(); strokes.forEach(drawStroke); }
function point(e) {   // pointer position -> canvas pixels, inside the border
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left - pad.clientLeft) * SIDE / pad.clientWidth,
          (e.clientY - r.top - pad.clientTop) * SIDE / pad.clientHeight];
}

pad.addEventListener("pointerdown", e => {
  if (current || (e.pointerType === "mouse" && e.button !== 0)) return;
  e.preventDefault();
  if (photo) { photo = null; strokes = []; paper(); }   // drawing starts afresh over a photo
  pad.setPointerCapture(e.pointerId);
  current = { id: e.pointerId, points: [point(e)] };
  strokes.push(current.points);
  dot(current.points[0]);
});
pad.addEventListener("pointermove", e => {
  if (!current || e.pointerId !== current.id) return;
  const events = (e.getCoalescedEvents && e.getCoalescedEvents().length) ? e.getCoalescedEvents() : [e];
  for (const ev of events) {
    const p = point(ev), last = current.points[current.points.length - 1];
    current.points.push(p);
    segment(last, p);
  }
  changed();
});
function endStroke(e) {
  if (!current || e.pointerId !== current.id) return;
  current = null;
  changed();   // always ask once more when a stroke ends
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);
pad.addEventListener("contextmenu", e => e.preventDefault());

function undo() {
  if (current) return;
  if (photo) photo = null; else strokes.pop();
  redraw(); changed();
}
function clearAll() {
  if (current) return;
  photo = null; strokes = [];
  redraw(); changed();
}
$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clearAll);
document.addEventListener("keydown", e => {
  if ((e.ctrlKey || e.metaKey) && !e.shiftKey && e.key.toLowerCase() === "z") {
    e.preventDefault(); undo();
  }
});

// ---- asking the server, at most every GAP_MS, and always for the last drawing --------------------------
function empty() { return !photo && strokes.length === 0; }
function changed() {
  version++;
  pad.dataset.version = version;
  $("undo").disabled = empty();
  $("clear").disabled = empty();
  if (empty()) { dirty = false; showEmpty(); return; }
  dirty = true;
  pump();
}
function pump() {
  if (busy || timer || !dirty) return;
  timer = setTimeout(() => { timer = null; send(); }, Math.max(0, lastSent + GAP_MS - performance.now()));
}
function canvasPng() { return new Promise(done => pad.toBlob(done, "image/png")); }
async function send() {
  if (busy || !dirty) return;
  dirty = false; busy = true; lastSent = performance.now();
  const sent = version;
  try {
    const body = photo ? photo.blob : await canvasPng();
    const reply = await fetch("/predict", { method: "POST", body,
                                            headers: { "Content-Type": body.type || "application/octet-stream" } });
    let data;
    try { data = await reply.json(); } catch (err) { data = { error: `the server answered ${reply.status}` }; }
    if (!empty()) {                    // cleared meanwhile: drop the answer
      if (reply.ok) showResult(data); else showError(data.error || `the server answered ${reply.status}`);
      $("bars").dataset.version = sent;
    }
  } catch (err) {
    showError("Cannot reach the server: is `python mnist_jax.py serve` still running?");
    $("bars").dataset.version = sent;
  } finally {
    busy = false;
    pump();
  }
}

// ---- showing the answer --------------------------------------------------------------------------------
const bars = [];
for (let d = 0; d < 10; d++) {
  const li = document.createElement("li");
  li.innerHTML = `<span>${d}</span><span class="track" role="meter" aria-label="probability of ${d}" ` +
                 `aria-valuemin="0" aria-valuemax="100" aria-valuenow="0"><span class="fill"></span></span>` +
                 `<span class="pct">0%</span>`;
  $("bars").appendChild(li);
  bars.push(li);
}
const blank28 = (() => { const c = document.createElement("canvas"); c.width = c.height = 28;
  const g = c.getContext("2d"); g.fillStyle = "#000"; g.fillRect(0, 0, 28, 28); return c.toDataURL(); })();
function percent(p) { return p >= 0.995 ? "100%" : p < 0.005 && p > 0 ? "<1%" : `${Math.round(100 * p)}%`; }
function setBars(probs) {
  const top = probs.indexOf(Math.max(...probs));
  bars.forEach((li, d) => {
    const p = probs[d];
    li.dataset.p = p;
    li.classList.toggle("top", probs.some(q => q > 0) && d === top);
    li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    li.querySelector(".track").setAttribute("aria-valuenow", Math.round(100 * p));
    li.querySelector(".pct").textContent = percent(p);
  });
}
function showResult(data) {
  $("digit").textContent = data.digit;
  $("confidence").textContent = `${percent(data.probabilities[data.digit])} sure`;
  setBars(data.probabilities);
  $("seen").src = data.input28;
  $("number").hidden = !("number" in data);
  $("number-value").textContent = data.number || "";
  $("error").textContent = "";
}
function showError(message) {
  $("digit").textContent = "?";
  $("confidence").textContent = "no answer";
  setBars(new Array(10).fill(0));
  $("seen").src = blank28;
  $("number").hidden = true;
  $("error").textContent = message;
}
function showEmpty() {
  showError("");
  $("confidence").textContent = "draw a digit";
  $("bars").dataset.version = version;
}

// ---- a photo instead of a drawing ----------------------------------------------------------------------
async function shrink(file) {   // a photo over 2 MB: send it at most 1600 px on its longer side, as JPEG
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, 1600 / Math.max(bitmap.width, bitmap.height));
  const c = document.createElement("canvas");
  c.width = Math.round(bitmap.width * scale); c.height = Math.round(bitmap.height * scale);
  c.getContext("2d").drawImage(bitmap, 0, 0, c.width, c.height);
  return new Promise(done => c.toBlob(done, "image/jpeg", 0.9));
}
async function showPhoto(blob, name) {
  paper();
  try {
    const bitmap = await createImageBitmap(blob);
    const scale = Math.min(SIDE / bitmap.width, SIDE / bitmap.height);
    const w = bitmap.width * scale, h = bitmap.height * scale;
    ctx.drawImage(bitmap, (SIDE - w) / 2, (SIDE - h) / 2, w, h);
  } catch (err) {                 // a format this browser cannot show: the server may still read it
    ctx.fillStyle = "#000"; ctx.font = "16px sans-serif"; ctx.textAlign = "center";
    ctx.fillText(name.slice(0, 30), SIDE / 2, SIDE / 2);
  }
}
$("photo").addEventListener("change", async () => {
  const file = $("photo").files[0];
  $("photo").value = "";
  if (!file || current) return;
  let blob = file;
  if (file.size > MAX_BYTES) {
    try { blob = await shrink(file); } catch (err) { showError("This photo is over 2 MB; crop or shrink it first."); return; }
  }
  photo = { blob };
  strokes = [];
  await showPhoto(blob, file.name);
  changed();
});

// ---- start ---------------------------------------------------------------------------------------------
paper();
changed();
fetch("/health").then(r => r.json()).then(h => {
  $("model").textContent = `Model: ${h.model}`;
  if (h.reads_numbers) $("hint").textContent = "Draw one digit, large, in the box, or a number: digits side by side.";
}).catch(() => {});
</script>
</body>
</html>
"""

# The page may load nothing from elsewhere (it works offline) and may not be framed by another site.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


class _ClientError(Exception):
    """A request the server refuses: HTTP status and a message for the user."""

    def __init__(self, status: int, message: str, headers: dict | None = None, unread: bool = False):
        super().__init__(message)
        self.status, self.headers, self.unread = status, headers or {}, unread  # unread: a body left unread


def _png_data_url(img28: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(img28, 0, 1) * 255).round().astype(np.uint8), "L").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _open_upload(body: bytes):
    """The bytes of a PNG, JPEG or WebP -> a PIL image, upright; ImageError for anything else."""
    if not body:
        raise ImageError("the request has no image: send a PNG or JPEG of a digit as the body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body), formats=SERVE_FORMATS)
            width, height = image.size
            if width * height > SERVE_MAX_PIXELS:
                raise ImageError(f"the image is {width} x {height} pixels, more than this server takes "
                                 f"({SERVE_MAX_PIXELS // 1_000_000} megapixels); shrink it first")
            image = ImageOps.exif_transpose(image)  # reads the pixels; a phone photo taken sideways is turned
    except ImageError:
        raise
    except Exception:  # whatever Pillow raises on bytes that are not a whole image it reads
        raise ImageError("the body is not a PNG, JPEG or WebP image that can be read") from None
    return image


def predict_upload(model, body: bytes) -> dict:
    """What POST /predict answers for an image's bytes: digit, probabilities, input28 (+ number). The steps
    that one digit and a row share (light, lines, ink) run once."""
    stages = {}
    image = _open_upload(body)
    contrast, angle = find_page(image, stages)
    img28 = one_digit(image, find_parts(image, contrast, stages), contrast, angle, stages)
    probs = np.asarray(probabilities(model, img28), np.float64).reshape(10)
    answer = {"digit": int(np.argmax(probs)), "probabilities": [round(float(p), 6) for p in probs],
              "input28": _png_data_url(img28)}
    digits, _ = digits_in_a_row(find_parts(image, contrast, stages, row=True), contrast, angle, stages)
    if len(digits) > 1:
        answer["number"] = digits_read(model, digits)
    return answer


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _DemoHandler(http.server.BaseHTTPRequestHandler):
    """The routes of the demo; everything else is a JSON error. One request per connection (HTTP/1.0)."""
    server_version = "mnist_jax"
    sys_version = ""
    routes = {"/": ("GET", "HEAD"), "/health": ("GET", "HEAD"), "/predict": ("POST",)}

    def setup(self):
        super().setup()  # sets the socket timeout to self.timeout (the server's per-operation timeout)
        self.server.watch(self.connection)

    def finish(self):
        self.server.unwatch(self.connection)
        try:
            super().finish()
        except OSError:  # the client went away
            pass

    @property
    def timeout(self):
        return self.server.client_timeout

    def log_message(self, format, *args):  # quiet: errors worth a line are printed where they happen
        pass

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, headers too long, ...) as JSON."""
        text = message or http.HTTPStatus(code).phrase
        self._reply(code, {"error": text}, {"Connection": "close"})

    def _reply(self, status: int, answer: dict | None, headers: dict | None = None,
               body: bytes | None = None, content_type: str = "application/json"):
        if body is None:
            body = json.dumps(answer).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type if content_type != "application/json"
                             else "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD" and status >= 200 and status not in (204, 304):
                self.wfile.write(body)
        except OSError:  # the client hung up before reading the answer
            self.close_connection = True

    def _route(self):
        try:
            host = urllib.parse.urlsplit("//" + (self.headers.get("Host") or "")).hostname
        except ValueError:
            raise _ClientError(400, "the Host header is not a host name") from None
        if self.server.local_only and host and not _is_loopback(host):
            # a web page elsewhere that made its own name point at 127.0.0.1 (DNS rebinding) cannot use us
            raise _ClientError(403, "this server answers only to localhost, 127.0.0.1 or [::1]")
        path = urllib.parse.urlsplit(self.path).path
        methods = self.routes.get(path)
        if methods is None:
            raise _ClientError(404, f"no page at {path[:100]}: this server has only /, /health and /predict")
        if self.command not in methods:
            raise _ClientError(405, f"{path} takes {' or '.join(methods)}, not {self.command}",
                               {"Allow": ", ".join(methods)})
        if path == "/":
            self._reply(200, None, {"Content-Security-Policy": PAGE_POLICY, "X-Frame-Options": "DENY"},
                        body=PAGE.encode("utf-8"), content_type="text/html; charset=utf-8")
        elif path == "/health":
            self._reply(200, {"ok": True, "model": self.server.description,
                              "reads_numbers": True})
        else:
            body = self._read_body()
            with self.server.predicting:
                try:
                    answer = predict_upload(self.server.model, body)
                except ImageError as e:
                    raise _ClientError(400, str(e)) from None
            self._reply(200, answer)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise _ClientError(411, "send the image with a Content-Length, not chunked", unread=True)
        length = self.headers.get("Content-Length")
        if length is None:
            raise _ClientError(411, "send the image with a Content-Length header", unread=True)
        if not length.strip().isdigit():
            raise _ClientError(400, f"Content-Length must be a number of bytes, not {length[:20]!r}", unread=True)
        length = int(length)
        if length > SERVE_MAX_BODY:
            raise _ClientError(413, f"the image is {length / 2**20:.1f} MB; this server takes at most "
                                    f"{SERVE_MAX_BODY // 2**20} MB: crop or shrink it first", unread=True)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise _ClientError(408, f"the client sent nothing for {self.timeout:g} s") from None
        if len(body) < length:
            raise _ClientError(400, "the body is shorter than its Content-Length")
        return body

    def _drop_unread_body(self, seconds: float = 2.0):
        """After refusing a body unread: closing at once, with bytes still unread, makes the system send a
        reset, and a client still sending would never see our answer. So say we are done (FIN), and read
        and drop what still comes, for a moment."""
        end = time.monotonic() + seconds
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while time.monotonic() < end:
                self.connection.settimeout(max(0.01, end - time.monotonic()))
                if not self.rfile.read1(65536):
                    break
        except OSError:
            pass

    def _handle(self):
        self.close_connection = True
        try:
            self._route()
        except _ClientError as e:
            self._reply(e.status, {"error": str(e)}, e.headers)
            if e.unread:
                self._drop_unread_body()
        except Exception as e:  # our bug, not the client's: one line on the console, a plain 500 to the client
            print(f"mnist_jax serve: {self.command} {self.path[:100]} failed: {e.__class__.__name__}: {e}",
                  file=sys.stderr)
            self._reply(500, {"error": "the server failed on this request; its console says why"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = _handle


class DemoServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that cuts off connections lasting past their deadline."""
    # Not daemon threads: server_close() cuts every open connection and waits for its thread. A thread
    # still alive while Python shuts down is stopped from inside C code, which can abort the process.
    daemon_threads = False
    block_on_close = True
    request_queue_size = SERVE_MAX_CONNECTIONS  # connections the system may hold before we accept them (5 by default)
    allow_reuse_address = True  # a restart right after Ctrl-C gets the same port (the OS still refuses a busy one)

    def server_bind(self):  # as HTTPServer's, without its reverse DNS lookup of the host (slow offline)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def __init__(self, address, model, description: str, timeout: float, deadline: float):
        self.model, self.description = model, description
        self.client_timeout, self.deadline = timeout, deadline
        self.local_only = _is_loopback(address[0])
        self.predicting = threading.BoundedSemaphore(SERVE_PREDICTIONS_AT_ONCE)
        self._slots = threading.BoundedSemaphore(SERVE_MAX_CONNECTIONS)
        self._open = {}  # connection -> time it must be done by
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._cut_late_connections, daemon=True,
                                          name="serve-watchdog")
        self._watchdog.start()
        super().__init__(address, _DemoHandler)  # on failure, it calls server_close(), which stops the watchdog

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def watch(self, connection):
        with self._lock:
            self._open[connection] = time.monotonic() + self.deadline

    def unwatch(self, connection):
        with self._lock:
            self._open.pop(connection, None)

    def _cut_late_connections(self):
        while not self._stop.wait(min(1.0, self.deadline / 4)):
            now = time.monotonic()
            with self._lock:
                late = [c for c, deadline in self._open.items() if deadline < now]
            self._cut(late)

    @staticmethod
    def _cut(connections):
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)  # its thread's next read or write ends at once
            except OSError:
                pass

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):  # too many open connections: no thread for this one
            try:
                request.settimeout(1)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\n\r\n{\"error\": \"too many connections; try again\"}")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # its thread gives the slot back
        except RuntimeError:  # no thread could be started
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        """An exception that escaped a handler: the client hung up or timed out; a line, never a traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, (OSError, ValueError)):  # ValueError: I/O on a socket the watchdog closed
            print(f"mnist_jax serve: connection from {client_address[0]} failed: "
                  f"{error.__class__.__name__}: {error}", file=sys.stderr)

    def server_close(self):
        self._stop.set()
        with self._lock:
            still_open = list(self._open)
        self._cut(still_open)
        super().server_close()  # stops listening, then joins the connections' threads
        self._watchdog.join()

    wakeup = None  # serve() sets it: a socket that receives a byte for each signal, whichever thread got it

    def service_actions(self):
        """Called by serve_forever between polls (every 0.25 s). Python runs a Ctrl-C handler in the main
        thread only, and when the signal lands in another thread (JAX has many) it can wait there unseen
        until the next one; the byte the signal wrote to `wakeup` is seen here either way."""
        if self.wakeup is not None:
            try:
                signals = self.wakeup.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            if signal.SIGINT in signals:
                raise KeyboardInterrupt


def make_server(model, host: str = "127.0.0.1", port: int = 8000, *, description: str | None = None,
                timeout: float = SERVE_TIMEOUT, deadline: float = SERVE_DEADLINE) -> DemoServer:
    """A demo server for `model` (a Model) bound to host:port (port 0: a free port), not yet serving.

    Run it with `server.serve_forever()` (in a thread for tests), stop it with `server.shutdown()` and
    `server.server_close()`. `server.url` is its address.

    Raises:
      UserError: the port is taken, or the host cannot be listened on.
    """
    probabilities(model, np.zeros((28, 28), np.float32))  # compile now, not on the first drawing
    server_class = DemoServer
    if ":" in host:  # an IPv6 address such as ::1
        server_class = type("DemoServer6", (DemoServer,), {"address_family": socket.AF_INET6})
    try:
        return server_class((host.strip("[]"), port), model, description or describe(model),
                            timeout, deadline)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use (another server?); stop it or choose "
                            f"another port with --port") from None
        if e.errno == errno.EACCES:
            raise UserError(f"not allowed to listen on port {port} of {host}; ports below 1024 need "
                            "administrator rights: choose another with --port") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(model, host: str = "127.0.0.1", port: int = 8000, ready: Callable | None = None) -> None:
    """Serve the drawing page for `model` (a Model, the path of a params.npz, or None: the last run's) until Ctrl-C.

    `ready(server)`, if given, is called once the server listens (tests use it to learn the port).
    """
    description = None
    if model is None or isinstance(model, (str, os.PathLike)):
        path = model if model is not None else latest_checkpoint()
        model = load_params(path)
        description = f"{describe(model)} from {path}"
    server = make_server(model, host, port, description=description)
    if not _is_loopback(host):
        print(f"warning: listening on {host}: anyone who can reach this machine on port "
              f"{server.server_address[1]} can use the demo (it reads no files and writes none).", file=sys.stderr)
    print(f"serving {server.description}: open {server.url} in a browser (Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(server)
    wakeup, signalled = socket.socketpair()
    previous = None
    try:
        wakeup.setblocking(False)
        signalled.setblocking(False)
        try:
            previous = signal.set_wakeup_fd(signalled.fileno(), warn_on_full_buffer=False)
            server.wakeup = wakeup
        except ValueError:  # not the main thread: Ctrl-C is not ours to see
            pass
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    finally:
        if previous is not None:
            signal.set_wakeup_fd(previous)
        server.server_close()
        wakeup.close()
        signalled.close()


# =============================================================================
# 8. Metrics and the command line
# =============================================================================

def classification_report(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Per-digit precision, recall and F1, their macro averages, and the confusion matrix.

    confusion[t][p] counts test images of true digit t predicted as p.
    precision = correct / predicted as this digit; recall = correct / truly this digit;
    F1 = their harmonic mean. A digit never predicted has precision 0.
    """
    confusion = np.zeros((10, 10), np.int64)
    np.add.at(confusion, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    correct = np.diag(confusion).astype(float)
    precision = np.divide(correct, confusion.sum(0), out=np.zeros(10), where=confusion.sum(0) > 0)
    recall = np.divide(correct, confusion.sum(1), out=np.zeros(10), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(10), where=precision + recall > 0)
    return {"precision": precision.round(4).tolist(), "recall": recall.round(4).tolist(),
            "f1": f1.round(4).tolist(), "macro_precision": round(float(precision.mean()), 4),
            "macro_recall": round(float(recall.mean()), 4), "macro_f1": round(float(f1.mean()), 4),
            "confusion_matrix": confusion.tolist()}


def format_report(report: dict) -> str:
    lines = ["digit  precision  recall     f1   | confusion matrix (rows: true digit, columns: predicted)"]
    for d in range(10):
        row = " ".join(f"{n:4d}" for n in report["confusion_matrix"][d])
        lines.append(f"  {d}      {report['precision'][d]:.4f}  {report['recall'][d]:.4f}  {report['f1'][d]:.4f} | {row}")
    lines.append(f"macro   {report['macro_precision']:.4f}  {report['macro_recall']:.4f}  {report['macro_f1']:.4f} |"
                 + "".join(f"{d:5d}" for d in range(10)))
    return "\n".join(lines)


def _number(text: str, kind: type, need: str, ok: Callable[[Any], bool] = lambda value: True):
    """`text` as an int or float for which `ok` holds; else the flag's error says what it must be
    (argparse alone would print the checking function's name)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, "a positive whole number", lambda v: v > 0)


def _seed(text: str) -> int:  # NumPy's shuffler takes no negative seed, jax.random.key no huge one
    return _number(text, int, f"a whole number from 0 to {2**32 - 1}", lambda v: 0 <= v < 2**32)


def _positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: v > 0 and math.isfinite(v))


def _fraction(text: str) -> float:
    """A number in [0, 1): a momentum or a dropout probability."""
    return _number(text, float, "at least 0 and below 1", lambda v: 0 <= v < 1)


def _non_negative_float(text: str) -> float:
    return _number(text, float, "0 or more", lambda v: v >= 0 and math.isfinite(v))


def _layer_sizes(text: str) -> tuple[int, ...]:
    """'1024,1024' -> (1024, 1024)."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"must be positive whole numbers separated by commas, like 512,512; got {text!r}")
    return sizes


def _run_name(text: str) -> str:
    if not text or text in (".", "..", "latest") or "/" in text or "\\" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(f"must be a plain folder name (no / and not 'latest'), got {text!r}")
    return text


def _flag(default, help: str, **argparse_options):
    return field(default=default, metadata=dict(help=help, **argparse_options))


# The settings that depend on the network when they are not given: a CNN learns in fewer epochs. The mlp
# takes steps twice as large as it once did (0.1, not 0.05), and so gets in 15 epochs what 20 gave
# before (README: Speed).
MODEL_DEFAULTS = {
    "mlp": {"epochs": 15, "batch_size": 128, "lr": 0.1},
    "resmlp": {"epochs": 20, "batch_size": 128, "lr": 0.05},
    "cnn": {"epochs": 3, "batch_size": 128, "lr": 0.05},
    "cnn-small": {"epochs": 3, "batch_size": 128, "lr": 0.05},
}


def _per_model(name: str) -> str:
    """'default: mlp 15, resmlp 20, cnn 3, ...' for a setting of MODEL_DEFAULTS."""
    return "default: " + ", ".join(f"{model} {defaults[name]}" for model, defaults in MODEL_DEFAULTS.items())


@dataclass(frozen=True)
class Config:
    """Every setting of a training run, with the defaults the README reports. Its fields are the flags."""
    data_dir: str = _flag("data", "folder with the four MNIST files; downloaded there if missing "
                          "(the MNIST_DATA_DIR environment variable changes the default)")
    name: str | None = _flag(None, "this run's folder under runs/ (default: the next free runs/MODEL-N)",
                             type=_run_name)
    out: str | None = _flag(None, "write this run's files exactly into this new or empty folder instead "
                            "(default: a folder under runs/)")
    model: str = _flag("mlp", "network: mlp, resmlp (with skip connections), cnn (32 and 64 filters), or cnn-small "
                       "(16 and 32 filters)",
                       choices=MODELS)
    hidden: tuple[int, ...] = _flag((512, 512), "hidden layer sizes of the mlp/resmlp, comma separated",
                                    type=_layer_sizes)
    activation: str = _flag("relu", "nonlinearity after each hidden layer", choices=("relu", "tanh"))
    batchnorm: bool = _flag(False, "batch normalisation after each hidden layer")
    dropout: float = _flag(0.2, "probability of dropping a hidden unit while training", type=_fraction)
    weight_decay: float = _flag(0.0, "L2 penalty: adds weight_decay * parameter to every gradient",
                                type=_non_negative_float)
    epochs: int | None = _flag(None, f"passes over the training set ({_per_model('epochs')})", type=_positive_int)
    batch_size: int | None = _flag(None, f"images per step, 1 = per-sample SGD ({_per_model('batch_size')})",
                                   type=_positive_int)
    lr: float | None = _flag(None, f"peak learning rate ({_per_model('lr')}); --schedule sets how it changes",
                             type=_positive_float)
    schedule: str = _flag("linear", "learning rate over the run: linear (from --lr down to 0), onecycle (up for "
                          "the first 25%% of steps, then down), cosine (up for 5%%, then a cosine down)",
                          choices=("linear", "onecycle", "cosine"))
    optimizer: str = _flag("sgd", "sgd (with --momentum) or adam", choices=("sgd", "adam"))
    momentum: float = _flag(0.9, "SGD momentum (0 = plain SGD)", type=_fraction)
    augment: bool = _flag(False, "randomly shift, turn, scale, shear, bend, thicken or thin each training image, "
                          "and cut small gaps in its strokes")
    grad: str = _flag("auto", "gradients from jax.grad (auto) or from the backward pass written by hand (manual)",
                      choices=("auto", "manual"))
    seed: int = _flag(0, "random seed: the same seed gives the same numbers", type=_seed)
    plots: bool = _flag(True, "--no-plots skips the PNG plots saved with the run")
    dry_run: bool = _flag(False, "a quick check: 1 epoch on 1,000 training and 1,000 test images")

    def resolved(self) -> "Config":
        """The settings left unset filled in for this model (MODEL_DEFAULTS)."""
        defaults = MODEL_DEFAULTS[self.model]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def net(self) -> Layer:
        return build_net(self.model, self.hidden, self.activation, self.batchnorm, self.dropout)

    def hyper(self) -> Hyper:
        return Hyper(float(self.lr), float(self.momentum), float(self.weight_decay), self.optimizer, self.schedule,
                     grad=self.grad, part=step_part(self.model, self.batchnorm))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        values = dict(values)
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        return cls(**values)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field: --data-dir, --hidden, --no-plots, ...; each help ends with its default."""
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        options = dict(f.metadata)
        default = f.default
        if f.name == "data_dir":
            default = os.environ.get("MNIST_DATA_DIR") or default
        if isinstance(default, bool):
            if default:  # a setting that is on by default gets a --no-... flag
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    help=options["help"] + " (default: on)")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=options["help"] + " (default: off)")
            continue
        if isinstance(default, tuple):
            default = ",".join(map(str, default))  # argparse runs `type` on a string default
        options.setdefault("type", str if default is None else type(default))
        help_text = options.pop("help") + ("" if default is None else " (default: %(default)s)")
        parser.add_argument(flag, dest=f.name, default=default, help=help_text, **options)


MEMORY_FRACTION = 0.5  # refuse a network whose training would need more than half of this machine's memory


def check_fits_in_memory(cfg: Config) -> None:
    """Refuse, before anything is allocated, a network whose training cannot fit in memory."""
    net = cfg.net()
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), net))  # shapes only: nothing allocated
    count = param_count(shapes.params)
    widest = max([784, *cfg.hidden, 32 * 26 * 26 if cfg.model.startswith("cnn") else 0])
    # parameters, gradients, velocity (two for Adam) and one spare copy, plus a batch's activations
    needed = 4 * (count * (5 if cfg.optimizer == "adam" else 4) + 4 * cfg.batch_size * widest * len(cfg.hidden))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if needed > MEMORY_FRACTION * total:
        raise UserError(f"this network has {count:,} parameters; training it would take about {needed / 2**30:,.1f} "
                        f"GiB of memory, more than half of this machine's {total / 2**30:.0f} GiB. Choose smaller "
                        "layers (--hidden) or a smaller --batch-size.")


def use_compile_cache() -> None:
    """Keep XLA's compiled programs on disk (in MNIST_JAX_CACHE, default ~/.cache/mnist_jax; empty: off), so
    that a second run of the same network compiles in a fraction of the time (README, Speed)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist_jax"
    folder = os.environ.get("MNIST_JAX_CACHE", str(default))
    if folder:
        try:  # a folder we cannot write (a read-only home) would make jax warn at every compile
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            print(f"note: compiled programs are not kept, as {folder} cannot be written ({e.strerror or e}); "
                  "set MNIST_JAX_CACHE to another folder, or to nothing to say no cache.", file=sys.stderr)
            return
        jax.config.update("jax_compilation_cache_dir", folder)
        # Every compiled program, however quick to compile. Setting up a run (the first parameters, the
        # optimiser's state) runs some 30 small operations one by one, each compiled on its own in about
        # 0.04 s: from the cache, the fastest recipe's run takes 0.5 s less.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _train_command(cfg: Config) -> int:
    timings = {"start": time.perf_counter() - STARTED}
    use_compile_cache()
    cfg = cfg.resolved()
    check_fits_in_memory(cfg)
    if cfg.plots and importlib.util.find_spec("matplotlib") is None:  # say so now, not after training
        raise UserError(NO_MATPLOTLIB)
    started = time.perf_counter()
    data = load_mnist(cfg.data_dir)
    timings["load"] = time.perf_counter() - started
    if cfg.dry_run:
        data = Dataset(data.train_images[:1000], data.train_labels[:1000], data.test_images[:1000],
                       data.test_labels[:1000])
        cfg = dataclasses.replace(cfg, epochs=1)
    check_batch_size(cfg.batch_size, len(data.train_images))  # before the run folder is made
    folder = claim_run_folder(cfg.to_json(), cfg.out, cfg.name)  # before training: refuse a folder now, not later
    saved = []

    def save(run: Run) -> None:
        save_checkpoint(folder, cfg.to_json(), run.model)
        metrics = {"config": cfg.to_json(), "epochs": run.epochs, "test_accuracy": run.epochs[-1]["test_accuracy"],
                   "seconds": {k: round(v, 3) for k, v in {**timings, **run.seconds}.items()}}
        metrics.update(classification_report(data.test_labels, run.predicted))
        write_atomically(folder / "metrics.json", lambda f: json.dump(metrics, f, indent=1), "w")
        point_latest_at(folder)
        saved.append(run.epochs[-1]["epoch"])

    print(f"run folder: {folder}")
    plotting = _import_pyplot_meanwhile() if cfg.plots else None
    try:
        run = train(cfg.net(), data, cfg.hyper(), cfg.epochs, cfg.batch_size, cfg.seed,
                    augment=augment_images if cfg.augment else None, on_epoch=save)
    except KeyboardInterrupt:
        print("\ninterrupted; " + (f"the checkpoint of epoch {saved[-1]} is in {folder / 'params.npz'}" if saved
                                   else "no epoch had finished, so no checkpoint was saved"), file=sys.stderr)
        return 130
    except Diverged as e:
        raise Diverged(f"{e} " + (f"The checkpoint of epoch {saved[-1]} is kept in {folder / 'params.npz'}."
                                  if saved else "Nothing was saved.")) from None
    finally:
        if plotting:
            plotting.join()
    timings.update(run.seconds)
    started = time.perf_counter()
    print(format_report(classification_report(data.test_labels, run.predicted)))
    timings["report"] = time.perf_counter() - started
    if cfg.plots:
        started = time.perf_counter()
        written = save_plots(folder, run, data)
        timings["plots"] = time.perf_counter() - started
        print("plots: " + ", ".join(p.name for p in written))
    timings["total"] = time.perf_counter() - STARTED
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    save(run)  # once more, with the whole run's timings in metrics.json
    print(f"saved in {folder}/; try: python mnist_jax.py predict YOUR_DIGIT.png")
    print(f"test accuracy: {run.epochs[-1]['test_accuracy']:.4f}")
    return 0


def _predict_command(args) -> int:
    model = load_params(args.params)
    show_dir, shown = None, set()
    failed = 0
    for path in args.files:
        try:
            if args.number:
                digits, _, steps = split_digits(path, steps=True)
                number = digits_read(model, digits)
                probs = None
                print(f"{path}: {number}")
            else:
                digit28, steps = preprocess(path, steps=True)
                probs, number = probabilities(model, digit28), None
                top = np.argsort(probs)[::-1][:3]
                print(f"{path}: {int(top[0])}   (" + ", ".join(f"{int(d)}: {probs[d]:.3f}" for d in top) + ")")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.show:  # a --show-dir that cannot be used stops the command (main says why), once
            show_dir = show_dir or _show_folder(args.show_dir)
            stem = Path(path).stem
            name = next(n for n in (f"{stem}_steps.png", *(f"{stem}-{i}_steps.png" for i in range(2, 10**6)))
                        if n not in shown)  # the same name twice in one command
            shown.add(name)
            figure = save_steps_figure(show_dir / name, path, steps, probs, number)
            print(f"  preprocessing steps saved to {figure}")
    if failed:
        print(f"{failed} of {len(args.files)} files could not be read", file=sys.stderr)
    return 1 if failed else 0


def _show_folder(show_dir: str | None) -> Path:
    """Where --show saves its pictures: a new runs/predict-N, or --show-dir, which must be new or empty."""
    if show_dir is None:
        for n in range(1, 1_000_000):
            folder = RUNS / f"predict-{n}"
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
    folder = Path(show_dir)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--show-dir {folder} is {'a file' if not folder.is_dir() else 'not empty'}; give a new or "
                        "empty folder (nothing in it is ever replaced), or leave it out to get runs/predict-N.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _port(text: str) -> int:
    value = _number(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free port), got {value}")
    return value


def make_serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist_jax.py serve",
                                     description="Draw digits in a web page and watch the network read them.")
    parser.add_argument("--params", default=None,
                        help="checkpoint to use (default: the last run's, runs/latest/params.npz)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; any other than 127.0.0.1 or localhost lets other machines "
                             "use the page (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on, 0 for any free one "
                                                                 "(default: %(default)s)")
    return parser


def make_parsers() -> dict[str, argparse.ArgumentParser]:
    train_parser = argparse.ArgumentParser(
        prog="mnist_jax.py", description="Train a network on MNIST with JAX. Other commands: "
        "`mnist_jax.py predict --help`, `mnist_jax.py serve --help`.")
    add_flags(train_parser)
    predict_parser = argparse.ArgumentParser(prog="mnist_jax.py predict",
                                             description="Read the digit in each image file.")
    predict_parser.add_argument("files", nargs="+", metavar="FILE", help="image files (PNG, JPEG, ...)")
    predict_parser.add_argument("--params", default=None,
                                help="checkpoint to use (default: the last run's, runs/latest/params.npz)")
    predict_parser.add_argument("--number", action="store_true",
                                help="read a row of digits written left to right, e.g. a year or a phone number "
                                     "(default: off, one digit per image)")
    predict_parser.add_argument("--show", action="store_true",
                                help="save a picture of each image's preprocessing steps and probabilities, "
                                     "NAME_steps.png, in a new folder runs/predict-N (default: off)")
    predict_parser.add_argument("--show-dir", default=None,
                                help="a new or empty folder for those pictures instead (default: runs/predict-N)")
    return {"train": train_parser, "predict": predict_parser, "serve": make_serve_parser()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parsers = make_parsers()
    try:
        if argv[:1] == ["predict"]:
            return _predict_command(parsers["predict"].parse_args(argv[1:]))
        if argv[:1] == ["serve"]:
            args = parsers["serve"].parse_args(argv[1:])
            use_compile_cache()
            serve(args.params, args.host, args.port)
            return 0
        args = parsers["train"].parse_args(argv)
        return _train_command(Config(**vars(args)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the file system said no: a folder that cannot be made or read
        print(f"error: {e.strerror or e}: {e.filename or 'file system'}", file=sys.stderr)
        return 1


# =============================================================================
# Speed notes: why some lines are written the way they are
# =============================================================================
# - Dense computes (W @ x.T).T rather than the textbook-equal x @ W.T: XLA:CPU
#   then reads W as stored, with no transposed copy per step (per-sample SGD, batch
#   1, is 3x faster), and sends the 10-wide output layer's weight gradient to its
#   fast matrix library (6-10% off the small MLP's epoch). W is stored (out, in).
# - Training keeps the images on the device as bytes and converts each batch in
#   the step (as_inputs): a quarter of the memory and of the bytes gathered.
# - The shuffle is drawn by NumPy on the host: a sort on the device costs 5-10 ms.
# - Momentum and weight decay are compile-time constants (Hyper is a static
#   argument): a term that is 0 is not computed at all.
# - CPU_COMPILER_OPTIONS lets XLA:CPU update weights in place without first
#   copying every weight matrix the backward pass still reads.
# - A convolution is patches x one 2-D matrix multiply (`patches`), far faster on
#   a CPU than lax.conv_general_dilated here (whose kernel gradient took longer
#   than a whole step). The max-pool's winner is found by comparisons the compiler
#   can fuse, not by a running count.
# - A CNN's step on a CPU goes through its batch 32 images at a time
#   (gradients_in_parts): their activations fit in the CPU's caches, 128's do not.
# README.md, "Speed", has the measurements.

if __name__ == "__main__":
    status = main()
    # On the way out Python collects garbage once more, walking every object that jax and matplotlib
    # made: 0.25-0.3 s of a 13 s run. Frozen objects it leaves alone; the process ends anyway.
    gc.freeze()
    sys.exit(status)
