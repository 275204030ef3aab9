"""On real MNIST (MNIST_DATA_DIR, as CI sets it to ../shared/mnist): the default run and the USPS photos."""
import csv
import os
from pathlib import Path

import numpy as np
import pytest

import mnist_jax
from conftest import ROOT, real_mnist_dir

DATA = real_mnist_dir()
USPS = Path(os.environ.get("USPS_PHOTOS_DIR", ROOT.parent / "shared" / "usps" / "photos"))
pytestmark = pytest.mark.skipif(DATA is None, reason="MNIST_DATA_DIR does not point at real MNIST files")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default run, exactly as `python mnist_jax.py` does it (no plots), on the real files."""
    out = tmp_path_factory.mktemp("default_run")
    assert mnist_jax.main(["--data-dir", str(DATA), "--out", str(out), "--no-plots"]) == 0
    return out


def test_default_run_reaches_95_percent(default_run):
    import json
    metrics = json.loads((default_run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95
    assert len(metrics["epochs"]) == mnist_jax.Config().epochs


@pytest.mark.skipif(not (USPS / "labels.csv").is_file(), reason=f"no USPS photos at {USPS}")
def test_predict_digit_reads_90_percent_of_usps_photos(default_run):
    ckpt = mnist_jax.load_params(default_run / "params.npz")
    with open(USPS / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    right = sum(mnist_jax.predict_digit(USPS / row["file"], ckpt) == int(row["label"]) for row in rows)
    print(f"predict_digit read {right} of {len(rows)} USPS photos right")
    assert len(rows) >= 1000 and right / len(rows) >= 0.90


def test_plain_resize_is_what_preprocessing_fixes(default_run):
    """The baseline the issue quotes: resizing a photo straight to 28x28 reads few of them right."""
    from PIL import Image
    ckpt = mnist_jax.load_params(default_run / "params.npz")
    with open(USPS / "labels.csv") as f:
        rows = list(csv.DictReader(f))[:300]
    raw = np.stack([np.asarray(Image.open(USPS / r["file"]).convert("L").resize((28, 28)), np.float32) / 255
                    for r in rows]).reshape(-1, 784)
    guesses = np.asarray(mnist_jax.predict(ckpt.net, ckpt.params, ckpt.stats, raw)).argmax(1)
    plain = (guesses == np.array([int(r["label"]) for r in rows])).mean()
    assert plain < 0.5  # preprocessing, not the network, is what makes photos readable
