"""Speed of mnist_jax, measured against references run in the same process (not a test).

    MNIST_DATA_DIR=../shared/mnist python tests/benchmark.py            # everything (over 10 minutes: photos ~5, fast99 ~2)
    MNIST_DATA_DIR=../shared/mnist python tests/benchmark.py mlp cnn    # some parts: mlp, default, cnn, manual

Prints, on the real training images:
  mlp      steady-state seconds per epoch and samples/s of 784-1024-1024-10 tanh and 784-128-10 relu at
           batch 128, the GFLOP/s they achieve against a matrix multiply timed here, and the same models in
           PyTorch eager (when torch is installed) as a ratio: jax time / torch time (lower is faster).
  default  the default run's time to 97.5% test accuracy.
  cnn      the CNN's epoch (batch 128, jax.grad and --grad manual) against PyTorch eager's for the same network.
  fast99   time to 99% test accuracy of the README's fastest recipe, against the same in PyTorch eager.
  manual   --grad manual against --grad auto: seconds per epoch and accuracy.
  serve    requests/s and p50/p95 latency of `serve`'s POST /predict for a 280x280 drawing.
  photos   predict_digit and read_number on the USPS photos and phone-style photos, for each checkpoint in
           BENCH_MODELS; how many blank pages they answer 'no digit found'; and the time from a 4000x3000
           JPEG to its digit.
Timings leave out compilation. Each time is the median of several epochs, with JAX and PyTorch taking
turns; each ratio is the median over those rounds of the two epochs' times in the same round, so that a
stretch when the machine runs slow (these shared machines have them) slows both sides of a ratio alike.
"""
import dataclasses
import os
from functools import partial
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # phone_photos
import mnist_jax  # noqa: E402
from mnist_jax import Config  # noqa: E402

try:
    import torch
except ImportError:
    torch = None


def load():
    folder = os.environ.get("MNIST_DATA_DIR", "data")
    data = mnist_jax.load_mnist(folder, log=lambda _: None)
    print(f"data: {folder}, {len(data.train_images):,} training and {len(data.test_images):,} test images")
    return data


class JaxEpoch:
    """One compiled training epoch of mnist_jax, callable again and again."""

    def __init__(self, cfg, data):
        cfg = cfg.resolved()
        self.x = jnp.asarray(data.train_images)  # bytes, as mnist_jax.train keeps them
        self.y = jnp.asarray(data.train_labels.astype(np.int32))
        self.steps = len(self.x) // cfg.batch_size
        hyper = cfg.hyper()._replace(total_steps=10 * self.steps)
        self.state = mnist_jax.start_training(mnist_jax.init_params(jax.random.key(0), cfg.net()), hyper)
        self.shuffler = np.random.default_rng(0)
        self.epoch = 0
        self.fn = mnist_jax.compile_function(partial(mnist_jax.train_epoch, hyper=hyper, batch_size=cfg.batch_size,
                                                     augment=mnist_jax.augment_images if cfg.augment else None),
                                             *self.arguments())

    def arguments(self):  # as mnist_jax.train passes them: the shuffle drawn on the host
        order = jnp.asarray(self.shuffler.permutation(len(self.x)).astype(np.int32))
        return self.state, self.x, self.y, order, jax.random.key(self.epoch)

    def __call__(self):
        self.epoch += 1
        out = self.fn(*self.arguments())
        jax.block_until_ready(out)
        self.state = out[0]


class TorchEpoch:
    """The same network and SGD in PyTorch eager, written the usual way."""

    def __init__(self, cfg, data):
        cfg = cfg.resolved()
        nn = torch.nn
        torch.manual_seed(0)
        if cfg.model == "mlp":
            layers, n = [], 784
            for h in cfg.hidden:
                layers += [nn.Linear(n, h), nn.Tanh() if cfg.activation == "tanh" else nn.ReLU()]
                if cfg.dropout:
                    layers.append(nn.Dropout(cfg.dropout))
                n = h
            self.model = nn.Sequential(*layers, nn.Linear(n, 10))
        else:  # the cnn and cnn-small presets of mnist_jax.build_net
            (a, b), dense = ((32, 64), 128) if cfg.model == "cnn" else ((16, 32), 64)
            self.model = nn.Sequential(
                nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, a, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(a, b, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(25 * b, dense), nn.ReLU(),
                *([nn.Dropout(cfg.dropout)] if cfg.dropout else []), nn.Linear(dense, 10))
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
        # mnist_jax's schedule, step by step, as a factor of the peak rate (for the whole run of `epochs`)
        total = len(data.train_images) // cfg.batch_size * cfg.epochs
        rates = np.asarray(mnist_jax.learning_rate(mnist_jax.Hyper(lr=1.0, schedule=cfg.schedule, total_steps=total),
                                                   np.arange(total)))  # computed once: no JAX call per step
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: float(rates[min(step, total - 1)]))
        self.x = torch.from_numpy(mnist_jax.as_inputs(data.train_images))
        self.y = torch.from_numpy(data.train_labels.astype(np.int64))
        self.batch = cfg.batch_size

    def __call__(self):
        self.model.train()
        order = torch.randperm(len(self.x))
        for i in range(len(self.x) // self.batch):
            idx = order[i * self.batch:(i + 1) * self.batch]
            self.opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
            loss.backward()
            self.opt.step()
            self.sched.step()

    def accuracy(self, images, labels):
        self.model.eval()
        with torch.no_grad():
            x = torch.from_numpy(mnist_jax.as_inputs(images))
            return float((self.model(x).argmax(1).numpy() == labels).mean())


def timed(epoch_fns, rounds):
    """Seconds of each of `rounds` epochs of each callable, after a warm-up epoch each.

    The callables take turns, in reverse order every other round, so that a
    stretch when the machine runs slow (these shared VMs have them) slows
    them alike and neither one always runs right after the other.
    """
    for fn in epoch_fns:
        fn()
    times = [[] for _ in epoch_fns]
    for r in range(rounds):
        for i in (range(len(epoch_fns)) if r % 2 == 0 else reversed(range(len(epoch_fns)))):
            start = time.perf_counter()
            epoch_fns[i]()
            times[i].append(time.perf_counter() - start)
    return times


def ratios(a, b):
    """Each round's time of `a` over that same round's time of `b`."""
    return [x / y for x, y in zip(a, b)]


def spread(values):
    """'median (middle half low-high)' of a list of ratios."""
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.2f} (middle half {q1:.2f}-{q3:.2f})"


def matmul_gflops(n=1024, m=128):
    """GFLOP/s of a jitted float32 (m x n) @ (n x n) matrix multiply, the shape a 1024-wide layer does."""
    a = jnp.ones((m, n), jnp.float32)
    b = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a, b: jax.lax.fori_loop(0, 200, lambda i, c: (c @ b) * 1e-3, a))
    jax.block_until_ready(f(a, b))
    start = time.perf_counter()
    jax.block_until_ready(f(a, b))
    return 200 * 2 * m * n * n / (time.perf_counter() - start) / 1e9


def mlp_flops_per_sample(sizes):
    """Multiply-adds x 2 for the forward pass, x 2 again for each of dW and dx (no dx for the input layer)."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    return sum(2 * a * b * 3 for a, b in pairs) - 2 * pairs[0][0] * pairs[0][1]


def bench_mlp(data):
    peak = matmul_gflops()
    print(f"\nmatmul (128x1024 @ 1024x1024, float32, jitted): {peak:.1f} GFLOP/s")
    print(f"{'model':28s} {'jax s/epoch':>11s} {'samples/s':>10s} {'GFLOP/s':>8s} {'of matmul':>9s}"
          f" {'torch s/epoch':>13s}  jax/torch, per round")
    # The small network's epochs are short and vary more from one to the next, so it gets more rounds.
    for name, cfg, target, rounds in (
            ("784-1024-1024-10 tanh", Config(hidden=(1024, 1024), activation="tanh", dropout=0.0), 0.8, 7),
            ("784-128-10 relu", Config(hidden=(128,), dropout=0.0), 0.5, 21)):
        cfg = cfg.resolved()
        fns = [JaxEpoch(cfg, data)] + ([TorchEpoch(cfg, data)] if torch else [])
        times = timed(fns, rounds)
        jax_s = statistics.median(times[0])
        samples = fns[0].steps * cfg.batch_size
        gflops = mlp_flops_per_sample([784, *cfg.hidden, 10]) * samples / jax_s / 1e9
        line = f"{name:28s} {jax_s:11.3f} {samples / jax_s:10,.0f} {gflops:8.1f} {gflops / peak:9.0%}"
        if torch:
            ratio = ratios(times[0], times[1])
            met = statistics.median(ratio) <= target
            line += (f" {statistics.median(times[1]):13.3f}  {spread(ratio)}  "
                     f"(target <= {target}: {'met' if met else 'MISSED'}, in {sum(r <= target for r in ratio)} "
                     f"of {rounds} rounds)")
            needed = gflops * statistics.median(ratio) / target  # the GFLOP/s at which the median meets it
            line += f"\n{'':28s} the target needs {needed:.0f} GFLOP/s, {needed / peak:.0%} of the matmul above"
        print(line)


def bench_default(data):
    cfg = Config().resolved()
    start = time.perf_counter()
    run = mnist_jax.train(cfg.net(), data, cfg.hyper(), cfg.epochs, cfg.batch_size, log=lambda _: None)
    total = time.perf_counter() - start
    elapsed, reached = 0.0, None
    for record in run.epochs:
        elapsed += record["seconds"]
        if record["test_accuracy"] >= 0.975 and reached is None:
            reached = (record["epoch"], elapsed)
    print(f"\ndefault run ({mnist_jax.describe(run.model)}, {len(run.epochs)} epochs): "
          f"final test accuracy {run.epochs[-1]['test_accuracy']:.4f}; compile {run.seconds['compile']:.1f} s; "
          f"whole run {total:.1f} s including data transfer and evaluation")
    if reached:
        print(f"  reached 97.5% after epoch {reached[0]}: {reached[1]:.1f} s of training (compilation excluded)")
    else:
        print("  did not reach 97.5%")


def bench_cnn(data):
    """The CNN as a user types it (--model cnn: batch 128, jax.grad), and with --grad manual, against PyTorch eager."""
    cfg = Config(model="cnn")
    fns = [JaxEpoch(cfg, data), JaxEpoch(dataclasses.replace(cfg, grad="manual"), data)]
    fns += [TorchEpoch(cfg, data)] if torch else []
    times = timed(fns, rounds=3)
    print(f"\ncnn (conv32-pool-conv64-pool-128, batch 128): jax {statistics.median(times[0]):.2f} s/epoch with "
          f"jax.grad, {statistics.median(times[1]):.2f} s/epoch with --grad manual "
          f"(manual/auto {spread(ratios(times[1], times[0])) if len(times[0]) > 2 else ''})")
    if torch:
        for name, t, target in (("jax.grad", times[0], 0.6), ("--grad manual", times[1], 0.6)):
            ratio = statistics.median(ratios(t, times[2]))
            print(f"  torch eager {statistics.median(times[2]):.2f} s/epoch; {name}: jax/torch {ratio:.2f} "
                  f"(target <= {target}: {'met' if ratio <= target else 'MISSED'}; per round "
                  f"{', '.join(f'{r:.2f}' for r in ratios(t, times[2]))})")


FAST99 = Config(model="cnn-small", optimizer="adam", schedule="onecycle", lr=0.007, batch_size=64, epochs=2,
                dropout=0.0)  # README: fastest to 99%


def bench_fast99(data, rounds: int = 3):
    """Training time to 99% test accuracy of the README's 'fastest to 99%' recipe, and of the same network,
    optimiser and schedule in PyTorch eager (test accuracy checked after each epoch). One run of each per
    round, side by side; the ratio is the median of the rounds' ratios, as the machine's speed drifts."""
    cfg = FAST99.resolved()

    def time_to_99(seconds_and_accuracies):
        elapsed = 0.0
        for seconds, accuracy in seconds_and_accuracies:
            elapsed += seconds
            if accuracy >= 0.99:
                return elapsed
        return None

    def jax_run():
        run = mnist_jax.train(cfg.net(), data, cfg.hyper(), cfg.epochs, cfg.batch_size, seed=0, log=lambda _: None)
        return run, time_to_99((r["seconds"], r["test_accuracy"]) for r in run.epochs)

    def torch_run():
        torch.manual_seed(0)
        reference = TorchEpoch(cfg, data)
        record = []
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            reference()
            record.append((time.perf_counter() - start, reference.accuracy(data.test_images, data.test_labels)))
        return record[-1][1], time_to_99(record)

    shown = lambda t: "%.1f s" % t if t else "not reached"
    jax_times, torch_times = [], []
    assert rounds >= 1
    for round_ in range(rounds if torch else 1):
        if torch and round_ % 2:  # the two sides take turns going first
            torch_accuracy, torch_time = torch_run()
        run, jax_time = jax_run()
        if torch and not round_ % 2:
            torch_accuracy, torch_time = torch_run()
        jax_times.append(jax_time)
        if torch:
            torch_times.append(torch_time)
    line = (f"\nfastest to 99% ({mnist_jax.describe(run.model)}, Adam, onecycle, batch {cfg.batch_size}): mnist_jax "
            f"{run.epochs[-1]['test_accuracy']:.2%} after {len(run.epochs)} epochs, time to 99% "
            f"{', '.join(map(shown, jax_times))} of training (compile {run.seconds['compile']:.1f} s apart)")
    if torch:
        line += f"; torch eager {torch_accuracy:.2%}, time to 99% {', '.join(map(shown, torch_times))}"
        if all(jax_times) and all(torch_times):
            each = [j / t for j, t in zip(jax_times, torch_times)]
            ratio = statistics.median(each)
            line += (f"; ratio {ratio:.2f} (rounds: {', '.join('%.2f' % r for r in each)}; "
                     f"target <= 0.5: {'met' if ratio <= 0.5 else 'MISSED'})")
    print(line)


def bench_manual(data):
    print(f"\n{'model':26s} {'auto s/epoch':>12s} {'manual s/epoch':>14s} {'manual/auto':>11s}")
    for name, cfg in (("mlp (default)", Config()), ("mlp batchnorm+dropout", Config(hidden=(128, 100), batchnorm=True)),
                      ("resmlp", Config(model="resmlp", hidden=(256, 256, 256))), ("cnn", Config(model="cnn"))):
        auto, manual = timed([JaxEpoch(cfg, data), JaxEpoch(dataclasses.replace(cfg, grad="manual"), data)],
                             rounds=3 if cfg.model == "cnn" else 9)
        ratio = statistics.median(ratios(manual, auto))
        print(f"{name:26s} {statistics.median(auto):12.3f} {statistics.median(manual):14.3f} {ratio:11.2f}  "
              f"(target <= 1.2: {'met' if ratio <= 1.2 else 'MISSED'})")


def bench_serve(model=None, seconds: float = 3.0, clients: int = 4):
    """Requests/s and p50/p95 latency of POST /predict for a 280x280 drawing, through a live server on
    127.0.0.1: one client sending one request after another, then `clients` at once. One connection per
    request, as the page makes them. Prints one line."""
    import concurrent.futures
    import http.client
    import io
    import threading
    from PIL import Image, ImageDraw

    if model is None:  # the default network; its weights do not change its speed
        model = mnist_jax.init_params(jax.random.key(0), Config().net())
    drawing = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(drawing).line([(80, 60), (200, 60), (120, 230)], fill=0, width=16, joint="curve")
    buffer = io.BytesIO()
    drawing.save(buffer, "PNG")
    body = buffer.getvalue()

    server = mnist_jax.make_server(model, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def one() -> float:
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        connection.request("POST", "/predict", body, {"Content-Type": "image/png"})
        reply = connection.getresponse()
        reply.read()
        connection.close()
        assert reply.status == 200, reply.status
        return time.perf_counter() - started

    def client(until: float) -> list:
        times = []
        while time.perf_counter() < until:
            times.append(one())
        return times

    try:
        for _ in range(20):
            one()
        results = []
        for n in (1, clients):
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                times = sum(pool.map(client, [started + seconds] * n), [])
            elapsed = time.perf_counter() - started
            cuts = statistics.quantiles(times, n=20)
            results.append(f"{n} client{'s' if n > 1 else ''}: {len(times) / elapsed:.0f} requests/s, "
                           f"p50 {1000 * statistics.median(times):.1f} ms, p95 {1000 * cuts[18]:.1f} ms")
    finally:
        server.shutdown()
        server.server_close()
    print(f"\nserve /predict, a 280x280 PNG drawing ({len(body):,} bytes), {mnist_jax.describe(model)}: "
          + "; ".join(results))


def bench_photos(data):
    """predict_digit on the USPS photos and on phone-style photos (tests/phone_photos.py, seed 0: 600 photos
    and 200 rows of 3-5 digits), for each checkpoint in BENCH_MODELS (comma separated; default the last
    run's); 200 blank pages of the same kind, which should be 'no digit found'; and the time from a
    4000x3000 JPEG file to its digit, the model loaded."""
    import csv
    import tempfile
    import phone_photos
    from PIL import Image

    paths = [p for p in os.environ.get("BENCH_MODELS", "").split(",") if p] or [str(mnist_jax.latest_checkpoint())]
    usps = Path(os.environ.get("USPS_PHOTOS_DIR", Path(__file__).resolve().parents[2] / "shared" / "usps" / "photos"))
    singles = list(phone_photos.single_photos(600, seed=0))
    rows = list(phone_photos.row_photos(200, seed=0))
    for path in paths:
        model = mnist_jax.load_params(path)
        line = f"\nphotos, {path} ({mnist_jax.describe(model)}):"
        if (usps / "labels.csv").is_file():
            with open(usps / "labels.csv") as f:
                listed = list(csv.DictReader(f))
            right = sum(mnist_jax.predict_digit(usps / r["file"], model) == int(r["label"]) for r in listed)
            line += f" USPS photos {right}/{len(listed)} ({right / len(listed):.1%});"
        right = failed = 0
        for image, label in singles:
            try:
                right += mnist_jax.predict_digit(image, model) == label
            except mnist_jax.ImageError:
                failed += 1
        line += f" phone photos {right}/{len(singles)} ({right / len(singles):.1%}, {failed} 'no digit found');"
        exact = 0
        for image, label in rows:
            try:
                exact += mnist_jax.read_number(image, model) == label
            except mnist_jax.ImageError:
                pass
        print(line + f" rows read exactly {exact}/{len(rows)} ({exact / len(rows):.1%})")
    said = {"predict_digit": 0, "read_number": 0}  # a page with nothing written on it: 'no digit found', never a guess
    blanks = list(phone_photos.blank_photos(200, seed=0))
    for image in blanks:
        for name, read in (("predict_digit", mnist_jax.predict_digit), ("read_number", mnist_jax.read_number)):
            try:
                read(image, model)
            except mnist_jax.ImageError:
                said[name] += 1
    print(f"blank pages (the same papers, light and tables, nothing written): 'no digit found' from "
          + ", ".join(f"{name} {n}/{len(blanks)}" for name, n in said.items()))
    with tempfile.TemporaryDirectory() as folder:
        image, label = next(phone_photos.single_photos(1, seed=99))
        big = Path(folder) / "big.jpg"
        image.resize((4000, 3000), Image.BICUBIC).save(big, quality=85)
        mnist_jax.predict_digit(big, model)  # compiled and warm
        times = []
        for _ in range(5):
            start = time.perf_counter()
            mnist_jax.predict_digit(big, model)
            times.append(time.perf_counter() - start)
        print(f"a 4000x3000 JPEG ({big.stat().st_size:,} bytes), file to digit: median {statistics.median(times):.3f} s "
              f"of 5 (target <= 0.5 s: {'met' if statistics.median(times) <= 0.5 else 'MISSED'})")


PARTS = {"mlp": bench_mlp, "default": bench_default, "cnn": bench_cnn, "fast99": bench_fast99, "manual": bench_manual,
         "serve": lambda data: bench_serve(), "photos": bench_photos}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(PARTS)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, "
          f"jax {jax.__version__} on {jax.default_backend()}" + (f", torch {torch.__version__} "
                                                                 f"({torch.get_num_threads()} threads)" if torch else
                                                                 ", torch not installed"))
    data = load()
    for part in chosen:
        PARTS[part](data)
