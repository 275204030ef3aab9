"""On real MNIST (MNIST_DATA_DIR, as CI sets it to ../shared/mnist): the default run and the USPS photos."""
import csv
import json
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
    out = tmp_path_factory.mktemp("default_run") / "run"
    assert mnist_jax.main(["--data-dir", str(DATA), "--out", str(out), "--no-plots"]) == 0
    return out


@pytest.fixture(scope="module")
def usps_rows():
    """The USPS photos' (file, label) rows; the tests that need them skip when they are not there."""
    if not (USPS / "labels.csv").is_file():
        pytest.skip(f"no USPS photos at {USPS} (set USPS_PHOTOS_DIR)")
    with open(USPS / "labels.csv") as f:
        return list(csv.DictReader(f))


def test_default_run_reaches_97_percent(default_run):
    metrics = json.loads((default_run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.97
    assert len(metrics["epochs"]) == mnist_jax.MODEL_DEFAULTS["mlp"]["epochs"]


def test_predict_digit_reads_90_percent_of_usps_photos(usps_rows, default_run):  # skip before training
    model = mnist_jax.load_params(default_run / "params.npz")
    right = sum(mnist_jax.predict_digit(USPS / row["file"], model) == int(row["label"]) for row in usps_rows)
    print(f"predict_digit read {right} of {len(usps_rows)} USPS photos right")
    assert len(usps_rows) >= 1000 and right / len(usps_rows) >= 0.90


def test_plain_resize_is_what_preprocessing_fixes(usps_rows, default_run):
    """The baseline: resizing a photo straight to 28x28 reads few of them right."""
    from PIL import Image
    model = mnist_jax.load_params(default_run / "params.npz")
    rows = usps_rows[:300]
    raw = np.stack([np.asarray(Image.open(USPS / r["file"]).convert("L").resize((28, 28)), np.float32) / 255
                    for r in rows]).reshape(-1, 784)
    guesses = np.asarray(mnist_jax.predict(model, raw)).argmax(1)
    plain = (guesses == np.array([int(r["label"]) for r in rows])).mean()
    assert plain < 0.5  # preprocessing, not the network, is what makes photos readable


def test_usps_tests_skip_without_the_photos(tmp_path):
    """With MNIST_DATA_DIR set and no USPS photos, the USPS tests skip; they do not error."""
    import subprocess
    import sys
    env = {**os.environ, "USPS_PHOTOS_DIR": str(tmp_path / "none")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", str(Path(__file__)), "-k", "usps_photos or "
                             "plain_resize", "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "2 skipped" in result.stdout and "error" not in result.stdout.lower(), \
        result.stdout


def test_phone_photos_are_read_by_the_default_model(default_run):
    """Phone-style photos (tests/phone_photos.py, another seed than the README's): the default MLP read
    91.5% of 600 photos and 73.0% of 200 rows of seed 0 (README); here, at least 88% and 55%."""
    import phone_photos
    model = mnist_jax.load_params(default_run / "params.npz")

    def read(read_fn, image):
        try:
            return read_fn(image, model)
        except mnist_jax.ImageError:  # "no digit found" counts as wrong
            return None

    singles = list(phone_photos.single_photos(100, seed=11))
    right = sum(read(mnist_jax.predict_digit, image) == label for image, label in singles)
    rows = list(phone_photos.row_photos(30, seed=11))
    exact = sum(read(mnist_jax.read_number, image) == label for image, label in rows)
    print(f"phone photos: {right}/{len(singles)}, rows: {exact}/{len(rows)}")
    assert right / len(singles) >= 0.88 and exact / len(rows) >= 0.55
