"""Shared helpers: synthetic IDX files, a local HTTP server, rendered digits."""
import gzip
import http.server
import os
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mnist_jax  # noqa: E402


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 00 00 08 ndim, big-endian sizes, the bytes."""
    array = np.asarray(array, np.uint8)
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def pattern_digits(n: int, seed: int = 0):
    """Images a network can learn: digit d is a bright 6x6 square at one of ten places, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, d in enumerate(labels):
        r, c = 3 + 10 * (d // 4), 3 + 7 * (d % 4)
        images[i, r:r + 6, c:c + 6] = 255
    return images, labels


def write_mnist(folder: Path, n_train: int = 600, n_test: int = 200, compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = pattern_digits(n, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return folder


@pytest.fixture(autouse=True)
def no_public_mirrors(monkeypatch, tmp_path_factory):
    """Tests never reach a public host: unless a test sets its own, the only mirror is a closed local port.
    And compiled programs are cached in a temporary folder, not the user's ~/.cache."""
    monkeypatch.setenv("MNIST_MIRRORS", "http://127.0.0.1:9/")
    monkeypatch.setenv("MNIST_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "jax-cache"))


@pytest.fixture
def mnist_dir(tmp_path):
    return write_mnist(tmp_path / "data")


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /<mode>/<file name>, mode in good, html, missing, forbidden, cut, wrong, slow, endless, drip."""
    files: dict = {}

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        _, mode, name = self.path.split("/", 2)
        body = self.files.get(name, b"")
        if mode == "missing":
            self.send_error(404)
        elif mode == "forbidden":
            self.send_error(403)
        elif mode == "html":
            self._send(b"<!DOCTYPE html><html><body>Access denied</body></html>")
        elif mode == "wrong":  # the right size and gzip magic, other bytes: only the MD5 can tell
            self._send(b"\x1f\x8b" + bytes(len(body) - 2))
        elif mode == "cut":  # promise the whole file, send a third, hang up
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
        elif mode == "slow":
            threading.Event().wait(2)
            self._send(body)
        elif mode == "endless":  # no length, and bytes that never stop (until the client hangs up)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
            try:
                for _ in range(100_000):  # 6.4 GB at most, so that the server too stops by itself
                    self.wfile.write(bytes(1 << 16))
            except OSError:
                pass
            self.close_connection = True
        elif mode == "drip":  # the right length promised, a byte every 0.2 s
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    threading.Event().wait(0.2)
            except OSError:
                pass
            self.close_connection = True
        else:
            self._send(body)

    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 (never a public host); `server.url` is its base address."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests = []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def published(monkeypatch, tmp_path_factory):
    """Synthetic MNIST files that the server offers, registered as 'the published files' (size and MD5)."""
    import hashlib
    folder = write_mnist(tmp_path_factory.mktemp("upstream"), 300, 100)
    files, table = {}, {}
    for name in mnist_jax.MNIST_FILES:
        data = (folder / name).read_bytes()
        files[name] = data
        table[name] = (len(data), hashlib.md5(data).hexdigest(), hashlib.md5(gzip.decompress(data)).hexdigest())
    monkeypatch.setattr(mnist_jax, "MNIST_FILES", table)
    monkeypatch.setattr(_Handler, "files", files)
    return files


def real_mnist_dir():
    """MNIST_DATA_DIR when it holds real MNIST files (CI points it at ../shared/mnist), else None."""
    folder = os.environ.get("MNIST_DATA_DIR")
    if folder and (Path(folder) / "t10k-images-idx3-ubyte.gz").is_file():
        return Path(folder)
    return None
