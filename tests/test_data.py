"""The IDX parser, the MNIST loader and the downloader, on files and a server the tests make."""
import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest

import mnist_jax
from conftest import ROOT, idx_bytes, write_idx, write_mnist

# --- parsing -----------------------------------------------------------------

def test_parse_reads_header_and_values():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(mnist_jax.parse_idx(idx_bytes(array)), array)


def test_parse_other_types_big_endian():
    values = np.array([1, -2, 300], ">i4")
    data = bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + values.tobytes()
    np.testing.assert_array_equal(mnist_jax.parse_idx(data), [1, -2, 300])


@pytest.mark.parametrize("compress", [True, False])
def test_loads_gzip_and_raw_files(tmp_path, compress):
    write_mnist(tmp_path, 50, 20, compress=compress)
    data = mnist_jax.load_mnist(tmp_path, log=lambda _: None)
    assert data.train_images.shape == (50, 28, 28) and data.test_labels.shape == (20,)
    assert data.train_images.dtype == np.uint8 and data.train_labels.max() <= 9


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00\x00\x08", "not an IDX file"),
    (b"\x12\x34\x56\x78" + bytes(100), "not an IDX file"),          # wrong magic
    (b"\x00\x00\x08\x03" + bytes(4), "truncated"),                    # header cut short
    (idx_bytes(np.zeros((5, 28, 28)))[:-10], "truncated"),            # data cut short
    (idx_bytes(np.zeros((5, 28, 28))) + b"extra", "longer than its header"),
    (b"<!DOCTYPE html><html>404</html>", "HTML page"),
    (b"just some text that is not idx", "not an IDX file"),
])
def test_bad_files_are_refused_with_the_file_named(tmp_path, content, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(mnist_jax.DataError, match=message) as err:
        mnist_jax.read_idx(path)
    assert str(path) in str(err.value)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    whole = gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 255, (500, 28, 28))))
    path.write_bytes(whole[:len(whole) // 3])  # like the 3.7 MB prefix of the 9.9 MB file
    with pytest.raises(mnist_jax.DataError, match="damaged or truncated gzip") as err:
        mnist_jax.read_idx(path)
    assert str(path) in str(err.value)


def test_html_saved_as_gz_is_refused_and_kept(tmp_path):
    write_mnist(tmp_path, 50, 20)
    page = b"<html><body>Repository page</body></html>"
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(page)
    with pytest.raises(mnist_jax.DataError, match="HTML page"):
        mnist_jax.load_mnist(tmp_path, log=lambda _: None)
    assert (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes() == page  # the user's file is not touched


def test_image_and_label_counts_must_match(tmp_path):
    write_mnist(tmp_path, 50, 20)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(49, np.uint8))
    with pytest.raises(mnist_jax.DataError, match="50 images but .* 49 labels"):
        mnist_jax.load_mnist(tmp_path, log=lambda _: None)


def test_labels_outside_0_to_9_are_refused(tmp_path):
    write_mnist(tmp_path, 50, 20)
    labels = np.zeros(20, np.uint8)
    labels[7] = 12
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(mnist_jax.DataError, match="label 12 outside 0-9 .at index 7"):
        mnist_jax.load_mnist(tmp_path, log=lambda _: None)


def test_images_must_be_28x28(tmp_path):
    write_mnist(tmp_path, 50, 20)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((20, 32, 32)))
    with pytest.raises(mnist_jax.DataError, match=r"shape \(20, 32, 32\)"):
        mnist_jax.load_mnist(tmp_path, log=lambda _: None)


def test_own_files_are_accepted_with_one_note(tmp_path):
    write_mnist(tmp_path, 50, 20)  # valid IDX, but not the published checksums
    lines = []
    data = mnist_jax.load_mnist(tmp_path, log=lines.append)
    assert len(data.train_images) == 50
    assert len(lines) == 4 and all("not the published file" in line for line in lines)


def test_published_content_is_recognised_however_it_was_compressed(tmp_path, monkeypatch, published):
    """A re-packed copy of the published data prints no note; a subset of it does."""
    for name, data in published.items():
        (tmp_path / name).write_bytes(gzip.compress(gzip.decompress(data), compresslevel=1))  # other .gz bytes
    lines = []
    mnist_jax.load_mnist(tmp_path, log=lines.append)
    assert lines == []
    images = mnist_jax.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:50])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", mnist_jax.read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")[:50])
    mnist_jax.load_mnist(tmp_path, log=lines.append)
    assert len(lines) == 2 and all("not the published file" in line for line in lines)


def test_data_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "data").write_text("not a folder")
    code = mnist_jax.main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    assert code == 1 and f"--data-dir {tmp_path / 'data'} is a file, not a folder" in capsys.readouterr().err


def test_implausible_header_is_refused_before_reading_on(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 4_000_000_000, 28, 28))
    with pytest.raises(mnist_jax.DataError, match="promises shape .4000000000, 28, 28., .* more than"):
        mnist_jax.read_idx(path)


BOMB = """
import gzip, resource, struct, sys, zlib
sys.path.insert(0, sys.argv[1])
import mnist_jax
path = sys.argv[2]
# A header promising 60,000 images (47 MB), followed by 1 GiB of zeros: a 1 MB gzip file.
with open(path, "wb") as raw:
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    raw.write(z.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 28, 28)))
    block = bytes(1 << 24)
    for _ in range(64):
        raw.write(z.compress(block))
    raw.write(z.flush())
try:
    mnist_jax.read_idx(path)
except mnist_jax.DataError as e:
    print("refused:", e)
print("peak MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_gzip_bomb_is_refused_with_bounded_memory(tmp_path):
    result = subprocess.run([sys.executable, "-c", BOMB, str(ROOT), str(tmp_path / "train-images-idx3-ubyte.gz")],
                            capture_output=True, text=True, timeout=300)
    assert "refused:" in result.stdout and "longer than its header says" in result.stdout, result.stderr
    peak = int(result.stdout.split("peak MB")[1])
    assert peak < 1000, f"{peak} MB"


# --- downloading from a local server -------------------------------------------

def test_first_mirror_html_second_good(tmp_path, server, published):
    urls = [f"{server.url}/html/", f"{server.url}/good/"]
    path = mnist_jax.download("train-labels-idx1-ubyte.gz", tmp_path, urls)
    assert path.read_bytes() == published["train-labels-idx1-ubyte.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-labels-idx1-ubyte.gz"]  # no temp file left


@pytest.mark.parametrize("mode, reason", [
    ("missing", "HTTP 404"),
    ("forbidden", "HTTP 403"),
    ("html", "HTML page"),
    ("wrong", "MD5"),
    ("cut", "truncated"),
])
def test_each_failure_is_named_and_leaves_no_file(tmp_path, server, published, mode, reason):
    urls = [f"{server.url}/{mode}/"]
    with pytest.raises(mnist_jax.DataError) as err:
        mnist_jax.download("train-images-idx3-ubyte.gz", tmp_path, urls)
    message = str(err.value)
    assert f"{server.url}/{mode}/train-images-idx3-ubyte.gz: " in message and reason in message
    assert "by hand" in message and "MNIST_MIRRORS" in message
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_moves_on_to_next_mirror(tmp_path, server, published):
    urls = [f"{server.url}/wrong/", f"{server.url}/missing/", f"{server.url}/good/"]
    path = mnist_jax.download("t10k-labels-idx1-ubyte.gz", tmp_path, urls)
    assert path.read_bytes() == published["t10k-labels-idx1-ubyte.gz"]
    assert [r.split("/")[1] for r in server.requests] == ["wrong", "missing", "good"]


def test_timeout_is_named(tmp_path, server, published):
    with pytest.raises(mnist_jax.DataError, match="timed out"):
        mnist_jax.download("t10k-labels-idx1-ubyte.gz", tmp_path, [f"{server.url}/slow/"], timeout=0.3)
    assert list(tmp_path.iterdir()) == []


def test_load_mnist_downloads_via_env_mirrors_then_works_offline(tmp_path, server, published, monkeypatch):
    monkeypatch.setenv("MNIST_MIRRORS", f"{server.url}/missing/,{server.url}/good")  # no trailing slash on purpose
    folder = tmp_path / "cache"
    lines = []
    data = mnist_jax.load_mnist(folder, log=lines.append)
    assert len(data.train_images) == 300 and len(data.test_images) == 100
    assert sum("downloading" in line for line in lines) == 4
    asked = len(server.requests)
    monkeypatch.setenv("MNIST_MIRRORS", "http://127.0.0.1:9/")  # nothing listens there
    again = mnist_jax.load_mnist(folder, log=lines.append)
    assert len(server.requests) == asked  # verified files are used with no network access
    np.testing.assert_array_equal(again.test_labels, data.test_labels)


def test_mirrors_default_and_env(monkeypatch):
    monkeypatch.delenv("MNIST_MIRRORS", raising=False)
    assert mnist_jax.mirrors() == list(mnist_jax.MIRRORS)
    monkeypatch.setenv("MNIST_MIRRORS", " http://a/x , http://b/ ")
    assert mnist_jax.mirrors() == ["http://a/x/", "http://b/"]


def test_all_mirrors_failing_is_one_clear_cli_error(tmp_path, server, published, monkeypatch, capsys):
    monkeypatch.setenv("MNIST_MIRRORS", f"{server.url}/html/,{server.url}/missing/")
    code = mnist_jax.main(["--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert f"{server.url}/html/" in err and f"{server.url}/missing/" in err and "by hand" in err


def test_mirror_without_a_scheme_is_named(tmp_path):
    with pytest.raises(mnist_jax.DataError, match="mirror.example/x/t10k-labels-idx1-ubyte.gz: not a usable URL"):
        mnist_jax.download("t10k-labels-idx1-ubyte.gz", tmp_path, ["mirror.example/x/"])
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask(tmp_path, server, published):
    import os
    old = os.umask(0o022)
    try:
        path = mnist_jax.download("t10k-labels-idx1-ubyte.gz", tmp_path, [f"{server.url}/good/"])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_body_longer_than_the_published_size_is_cut_off(tmp_path, server, published):
    with pytest.raises(mnist_jax.DataError, match=r"sent more than the published [\d,]+ bytes .stopped there") as err:
        mnist_jax.download("t10k-labels-idx1-ubyte.gz", tmp_path, [f"{server.url}/endless/"])
    assert "endless" in str(err.value) and list(tmp_path.iterdir()) == []


def test_a_dripping_mirror_meets_a_deadline_and_shows_progress(tmp_path, server, published, monkeypatch):
    monkeypatch.setattr(mnist_jax, "DOWNLOAD_MIN_SECONDS", 1.5)
    lines = []
    with pytest.raises(mnist_jax.DataError, match=r"too slow: \d+ of [\d,]+ bytes after \d+ s"):
        mnist_jax.download("t10k-labels-idx1-ubyte.gz", tmp_path, [f"{server.url}/drip/"], log=lines.append)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(mnist_jax, "DOWNLOAD_MIN_SECONDS", 10)
    with pytest.raises(mnist_jax.DataError, match="too slow"):
        mnist_jax.download("t10k-labels-idx1-ubyte.gz", tmp_path, [f"{server.url}/drip/"], log=lines.append)
    assert any("MB/s" in line and " of " in line for line in lines)  # the progress line


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, server, published, monkeypatch):
    import errno
    import os
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(mnist_jax.UserError, match="could not write .*t10k-labels-idx1-ubyte.gz.*disk holding .* is "
                                                  "full: free some space there"):
        mnist_jax.download("t10k-labels-idx1-ubyte.gz", tmp_path, [f"{server.url}/good/"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []
