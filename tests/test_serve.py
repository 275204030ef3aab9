"""`python mnist_jax.py serve`: the HTTP API against a live server on a free port, and the page in a real browser."""
import base64
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

import mnist_jax
from conftest import ROOT
from mnist_jax import Config

M = mnist_jax


def tiny_model(hidden=(32,)):
    """An untrained network: its answers are as good as any for testing the server, and it costs no training."""
    return mnist_jax.init_params(jax.random.key(0), Config(hidden=hidden, dropout=0.0).net())


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@contextlib.contextmanager
def running(model, **options):
    server = M.make_server(model, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def server(model):
    with running(model) as server:
        yield server


def request(server, method, path, body=None, headers=None, timeout=10):
    """(status, headers, JSON answer or the raw bytes) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        data = reply.read()
        headers = {k.lower(): v for k, v in reply.getheaders()}
    finally:
        connection.close()
    if headers.get("content-type", "").startswith("application/json"):
        data = json.loads(data)
    return reply.status, headers, data


def raw(server, data: bytes, read=True, timeout=5) -> bytes:
    """Send bytes as they are on a fresh connection; what comes back until the server closes it."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def drawing(digit="7", size=280, fmt="PNG", width=None) -> bytes:
    """A digit drawn as strokes, black ink on white, as the page's canvas sends it."""
    image = Image.new("L", (size, size), 255)
    pen = ImageDraw.Draw(image)
    s = size / 280
    strokes = {"7": [[(80, 60), (200, 60), (120, 230)]], "1": [[(140, 50), (140, 230)]],
               "0": [[(140, 50), (200, 100), (200, 180), (140, 230), (80, 180), (80, 100), (140, 50)]],
               "4": [[(170, 230), (170, 50), (70, 170), (210, 170)]]}[digit]
    for line in strokes:
        pen.line([(x * s, y * s) for x, y in line], fill=0, width=width or round(size / 18), joint="curve")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, fmt)
    return buffer.getvalue()


def expected(model, body: bytes):
    img28 = M.preprocess(Image.open(io.BytesIO(body)))
    return img28, np.asarray(M.probabilities(model, img28))


# ---- the routes ---------------------------------------------------------------------------------------------

def test_page_is_one_offline_page(server):
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    page = page.decode()
    for part in ("<canvas", 'name="viewport"', "touch-action: none", "pointerdown", "image-rendering: pixelated",
                 'id="undo"', 'id="clear"', 'type="file"', "/predict"):
        assert part in page, part
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//|@import|url\(", page), "the page loads nothing else"
    assert "default-src 'none'" in headers["content-security-policy"]


def test_health(server):
    status, headers, answer = request(server, "GET", "/health")
    assert status == 200 and answer["ok"] is True
    assert answer["model"] == "784-32-10" and answer["reads_numbers"] is True
    assert headers["server"].startswith("mnist_jax")  # no Python version shown


def test_head_gives_headers_only(server):
    status, headers, body = request(server, "HEAD", "/")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_predict_answers_as_predict_digit_would(server, model, fmt):
    body = drawing("7", fmt=fmt)
    status, _, answer = request(server, "POST", "/predict", body, {"Content-Type": f"image/{fmt.lower()}"})
    assert status == 200, answer
    img28, probs = expected(model, body)
    assert answer["digit"] == int(np.argmax(probs))
    np.testing.assert_allclose(answer["probabilities"], probs, atol=1e-5)
    assert abs(sum(answer["probabilities"]) - 1) < 1e-4
    header, data = answer["input28"].split(",", 1)
    assert header == "data:image/png;base64"
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    assert seen.shape == (28, 28) and np.abs(seen / 255 - img28).max() <= 1 / 255 + 1e-6
    assert "number" not in answer  # one digit


def white_png():
    buffer = io.BytesIO()
    Image.new("RGB", (280, 280), "white").save(buffer, "PNG")
    return buffer.getvalue()


def gif():
    buffer = io.BytesIO()
    Image.new("L", (20, 20), 0).save(buffer, "GIF")
    return buffer.getvalue()


@pytest.mark.parametrize("body, message", [
    (b"", "no image"),
    (b"this is not an image", "not a PNG, JPEG or WebP"),
    (drawing()[:200], "not a PNG, JPEG or WebP"),  # cut short
    (gif(), "not a PNG, JPEG or WebP"),
    (white_png(), "no digit found"),
], ids=["empty", "text", "truncated", "gif", "blank drawing"])
def test_bad_images_are_400_with_a_message(server, body, message):
    status, headers, answer = request(server, "POST", "/predict", body)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert message in answer["error"]


def test_huge_image_dimensions_are_refused(server, monkeypatch):
    monkeypatch.setattr(M, "SERVE_MAX_PIXELS", 100 * 100)
    status, _, answer = request(server, "POST", "/predict", drawing())
    assert status == 400 and "280 x 280 pixels" in answer["error"]


def test_body_over_2_mb_is_413(server):
    body = drawing() + b"\0" * (2 * 1024 * 1024)  # the whole body sent: the client still reads the 413
    status, _, answer = request(server, "POST", "/predict", body)
    assert status == 413 and "at most 2 MB" in answer["error"]
    started = time.monotonic()  # only announced: refused from the header, before any of it is read
    answer = raw(server, b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 413 ") and time.monotonic() - started < 3


@pytest.mark.parametrize("headers, status", [
    ("", 411),
    ("Transfer-Encoding: chunked\r\n", 411),
    ("Content-Length: abc\r\n", 400),
    ("Content-Length: -5\r\n", 400),
])
def test_body_length_must_be_given(server, headers, status):
    answer = raw(server, f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode() + b"5\r\nhello\r\n0\r\n\r\n")
    assert answer.startswith(f"HTTP/1.0 {status} ".encode())
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


@pytest.mark.parametrize("path", ["/nope", "/index.html", "/../mnist_jax.py", "/%2e%2e/mnist_jax.py", "//etc/passwd",
                                  "/predict/", "/health/x", "/static/../../etc/passwd"])
def test_unknown_paths_are_404(server, path):
    status, _, answer = request(server, "GET", path)
    assert status == 404 and "only /, /health and /predict" in answer["error"]


@pytest.mark.parametrize("method, path, allow", [
    ("POST", "/", "GET, HEAD"), ("PUT", "/", "GET, HEAD"), ("DELETE", "/health", "GET, HEAD"),
    ("GET", "/predict", "POST"), ("PUT", "/predict", "POST"), ("OPTIONS", "/predict", "POST"),
])
def test_wrong_method_is_405_with_allow(server, method, path, allow):
    status, headers, answer = request(server, method, path, b"" if method in ("POST", "PUT") else None)
    assert status == 405 and headers["allow"] == allow and method in answer["error"]


def test_malformed_requests_get_json_errors(server):
    # http.server answers a request line it cannot parse as HTTP/0.9 would: the body alone
    assert raw(server, b"GET / HTTP/9.x\r\n\r\n").startswith(b'{"error": "Bad request version')
    assert raw(server, b"NONSENSE\r\n\r\n").startswith(b'{"error": "Bad request syntax')
    answer = raw(server, b"GET / HTTP/1.1\r\n" + b"X-Many: headers\r\n" * 101 + b"\r\n")
    assert answer.startswith(b"HTTP/1.0 431 ") and b'{"error": "Too many headers' in answer
    answer = raw(server, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 414 ")


def test_only_local_host_names_are_answered(server):
    assert request(server, "GET", "/health", headers={"Host": "attacker.example"})[0] == 403
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert request(server, "GET", "/health", headers={"Host": host})[0] == 200


def test_client_errors_leave_no_traceback_and_the_server_serving(server, capfd):
    request(server, "POST", "/predict", b"junk")
    request(server, "GET", "/nope")
    raw(server, b"POST /predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\nonly a part", read=False)  # hangs up
    raw(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100) + b"\r\n")  # a TLS hello
    time.sleep(0.2)
    assert request(server, "GET", "/health")[0] == 200
    assert capfd.readouterr().err == ""


def test_unexpected_failure_is_a_500_and_one_line(server, monkeypatch, capfd):
    def broken(model, img28):
        raise RuntimeError("a bug")
    monkeypatch.setattr(M, "probabilities", broken)
    status, _, answer = request(server, "POST", "/predict", drawing())
    assert status == 500 and "a bug" not in answer["error"]
    monkeypatch.undo()
    assert request(server, "POST", "/predict", drawing())[0] == 200
    err = capfd.readouterr().err
    assert "RuntimeError: a bug" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---- slow clients, many clients -----------------------------------------------------------------------------

def test_stalled_client_is_cut_off_while_others_are_served(model):
    with running(model, timeout=0.5, deadline=2.0) as server:
        stalled = socket.create_connection(("127.0.0.1", server.server_address[1]))
        stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")  # then nothing
        headers_only = socket.create_connection(("127.0.0.1", server.server_address[1]))
        headers_only.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        started = time.monotonic()
        assert request(server, "POST", "/predict", drawing())[0] == 200
        for s in (stalled, headers_only):
            s.settimeout(5)
            answer = s.recv(65536)
            assert answer == b"" or answer.startswith(b"HTTP/1.0 408 ")
            s.close()
        assert time.monotonic() - started < 2


def test_closing_the_server_ends_all_its_threads(model):
    """A thread left running while Python exits can abort the process (it did, one Ctrl-C in seven):
    server_close() must cut open connections and wait for every thread the server started."""
    before = set(threading.enumerate())
    with running(model) as server:  # default timeouts: 10 s silent, 30 s in all
        idle = socket.create_connection(("127.0.0.1", server.server_address[1]))
        idle.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a request never finished
        assert request(server, "GET", "/health")[0] == 200
        started = time.monotonic()
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    idle.close()
    assert left == [] and time.monotonic() - started < 3, (left, time.monotonic() - started)


def test_trickling_client_is_cut_off_at_the_deadline(model):
    with running(model, timeout=1.0, deadline=1.5) as server:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\n")
            with pytest.raises(OSError):  # a header line every 0.1 s: never silent for long, cut off anyway
                for i in range(60):
                    s.sendall(b"X-Slow: %d\r\n" % i)  # fails once the server has closed the connection
                    time.sleep(0.1)
        assert 1.4 < time.monotonic() - started < 3.5


def test_too_many_connections_get_503(model, monkeypatch):
    monkeypatch.setattr(M, "SERVE_MAX_CONNECTIONS", 2)
    with running(model, timeout=2.0, deadline=2.0) as server:
        held = [socket.create_connection(("127.0.0.1", server.server_address[1])) for _ in range(2)]
        time.sleep(0.2)
        assert raw(server, b"GET /health HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 503 ")
        for s in held:
            s.close()
        time.sleep(0.2)
        assert request(server, "GET", "/health")[0] == 200


def test_20_clients_at_once_each_get_their_own_answers(server, model):
    """20 clients at once, 5 requests each (each answer is the network's for that client's drawing)."""
    bodies = [drawing(d) for d in "1704"]
    answers = [expected(model, b)[1] for b in bodies]

    def client(number):
        for i in range(5):
            k = (number + i) % len(bodies)
            status, _, answer = request(server, "POST", "/predict", bodies[k])
            assert status == 200, answer
            np.testing.assert_allclose(answer["probabilities"], answers[k], atol=1e-5)
        return number

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        done = list(pool.map(client, range(20), timeout=60))
    assert done == list(range(20)) and time.monotonic() - started < 60


# ---- starting and stopping ----------------------------------------------------------------------------------

def test_port_in_use_is_a_clear_error(model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(mnist_jax.UserError, match=f"port {port} .*already in use"):
            M.make_server(model, "127.0.0.1", port)


def test_serve_warns_when_listening_beyond_this_machine(model, capsys):
    M.serve(model, "0.0.0.0", 0, ready=lambda server: threading.Thread(target=server.shutdown).start())
    out, err = capsys.readouterr()
    assert "warning: listening on 0.0.0.0" in err and "http://127.0.0.1:" in out


def test_serve_prints_the_url_and_stops_on_ctrl_c():
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # even if started ignoring it
            "sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']; import test_serve as t; "
            "t.M.serve(t.tiny_model(), '127.0.0.1', 0)")
    process = subprocess.Popen([sys.executable, "-c", code, str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert url, line + process.stderr.read()
        connection = http.client.HTTPConnection("127.0.0.1", int(url[1]), timeout=10)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        connection.close()
        process.send_signal(signal.SIGINT)
        code, err = process.wait(10), process.stderr.read()
        assert code == 0 and "Traceback" not in err, (code, err)
    finally:
        process.kill()
        process.wait()


# ---- the page in a real browser -----------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.skip(f"{path} is missing (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def reader():
    """(model, reads real handwriting?): a quick MNIST model when MNIST_DATA_DIR has the files, else the tiny one."""
    folder = os.environ.get("MNIST_DATA_DIR")
    if folder and Path(folder, "t10k-images-idx3-ubyte.gz").exists():
        data = mnist_jax.load_mnist(folder, log=lambda _: None)
        data = mnist_jax.Dataset(data.train_images[:30000], data.train_labels[:30000], data.test_images[:1000],
                                 data.test_labels[:1000])
        cfg = Config(hidden=(128,), epochs=1, batch_size=64, lr=0.05, dropout=0.0)  # 93% in about 3 s
        run = mnist_jax.train(cfg.net(), data, cfg.hyper(), 1, 64, log=lambda _: None)
        return run.model, True
    return tiny_model(), False


def draw(driver, pad, strokes, kind="mouse"):
    """Strokes of points given as fractions of the canvas side, drawn with the mouse, a finger or a pen."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    side = pad.rect["width"]
    at = lambda x, y: (round((x - 0.5) * side), round((y - 0.5) * side))  # offsets from the centre
    pointer = PointerInput({"mouse": interaction.POINTER_MOUSE, "touch": interaction.POINTER_TOUCH,
                            "pen": interaction.POINTER_PEN}[kind], kind)
    actions = ActionBuilder(driver, mouse=pointer, duration=15)
    for points in strokes:
        actions.pointer_action.move_to(pad, *at(*points[0])).pointer_down()
        for a, b in zip(points, points[1:]):
            for t in np.linspace(0.25, 1, 4):  # a few moves per segment, as a hand makes
                actions.pointer_action.move_to(pad, *at(a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])))
        actions.pointer_action.pointer_up()
    actions.perform()


def version(driver) -> int:
    """How many times the drawing (or photo) on the page has changed."""
    return int(driver.execute_script("return document.getElementById('pad').dataset.version"))


def shown(driver, since: int = -1):
    """Wait until the drawing has changed since version `since` and the page shows the answer for its latest
    state; (digit text, probabilities, page state)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "const v = document.getElementById('pad').dataset.version;"
        "return Number(v) > arguments[0] && document.getElementById('bars').dataset.version === v", since))
    return driver.execute_script("""
        const $ = id => document.getElementById(id);
        return [$('digit').textContent, [...$('bars').children].map(li => Number(li.dataset.p || 0)),
                {error: $('error').textContent, seen: $('seen').src, number: $('number').hidden ? null :
                 $('number-value').textContent, width: $('bars').querySelector('li.top .fill')?.style.width}];""")


ONE = [[(0.5, 0.2), (0.5, 0.8)]]
SEVEN = [[(0.3, 0.22), (0.7, 0.22)], [(0.7, 0.22), (0.45, 0.82)]]


def test_drawing_in_a_browser(browser, reader, tmp_path):
    model, reads = reader
    with running(model) as server:
        browser.get(server.url)
        pad = browser.find_element("id", "pad")
        assert shown(browser)[0] == "?"
        for strokes, digit, kind in ((ONE, "1", "mouse"), (SEVEN, "7", "touch")):
            browser.find_element("id", "clear").click()
            before = version(browser)
            draw(browser, pad, strokes, kind)
            text, probs, state = shown(browser, before)
            assert text.isdigit() and (text == digit or not reads), (kind, text, probs)
            assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-3 and int(text) == int(np.argmax(probs))
            assert state["error"] == "" and state["seen"].startswith("data:image/png;base64,")
        from selenium.webdriver.common.action_chains import ActionChains
        ActionChains(browser).move_to_element(browser.find_element("tag name", "h1")).perform()  # no hover
        inner, outer = browser.execute_script("return [innerHeight, document.documentElement.scrollHeight]")
        browser.set_window_size(1100, 800 - inner + outer)  # the whole page in the picture
        browser.save_screenshot(os.environ.get("SERVE_SCREENSHOT") or str(tmp_path / "serve.png"))
        browser.set_window_size(1100, 800)

        before = version(browser)
        browser.find_element("id", "undo").click()  # back to the 7's top bar alone
        assert shown(browser, before)[0].isdigit()
        before = version(browser)
        browser.find_element("id", "clear").send_keys("\n")  # the keyboard works the buttons
        assert shown(browser, before)[0] == "?" and browser.find_element("id", "clear").get_property("disabled")


def test_upload_a_photo_in_a_browser(browser, reader, tmp_path):
    model, reads = reader
    photo, not_photo = tmp_path / "seven.jpg", tmp_path / "notes.png"
    photo.write_bytes(drawing("7", size=600, fmt="JPEG", width=30))
    not_photo.write_bytes(b"not an image")
    with running(model) as server:
        browser.get(server.url)
        upload = browser.find_element("id", "photo")
        before = version(browser)
        upload.send_keys(str(not_photo))
        text, _, state = shown(browser, before)
        assert text == "?" and "not a PNG, JPEG or WebP" in state["error"]
        before = version(browser)
        upload.send_keys(str(photo))
        text, probs, state = shown(browser, before)
        assert state["error"] == "" and (text == "7" or not reads) and abs(sum(probs) - 1) < 1e-3


def test_number_is_sent_when_several_digits_are_drawn(server, model):
    """Two digits side by side: the answer also has the number, as read_number reads it; one digit: no number."""
    image = Image.new("L", (560, 280), 255)
    image.paste(Image.open(io.BytesIO(drawing("1"))).convert("L"), (0, 0))
    image.paste(Image.open(io.BytesIO(drawing("7"))).convert("L"), (280, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    status, _, answer = request(server, "POST", "/predict", buffer.getvalue())
    assert status == 200 and len(answer["number"]) == 2
    assert answer["number"] == mnist_jax.read_number(image, model)
    assert request(server, "GET", "/health")[2]["reads_numbers"] is True
    assert "number" not in request(server, "POST", "/predict", drawing())[2]  # one digit: the digit says it