"""The HTTP service, started for real (``iadkit serve``) on a loopback port, serving a saved
detector (PyTorch) and its ONNX export (OpenVINO)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import free_loopback_port
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from iadkit.cli import main
from iadkit.data.image_io import read_image
from iadkit.methods import Detector
from iadkit.regions import find_regions

MAX_UPLOAD_MB = 1.0
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def fitted_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a small PatchCore."""
    run = tmp_path_factory.mktemp("serve") / "run"
    assert main(["fit", "--method", "patchcore", "--data", str(toy_root), "--category", "alpha",
                 "--out", str(run), "--param", "image_size=64", "--device", "cpu",
                 "--quiet"]) == 0
    return run


@pytest.fixture(scope="module")
def exported_run(fitted_run: Path) -> Path:
    """The ONNX export of :func:`fitted_run`."""
    pytest.importorskip("onnxruntime")  # the export checks its graph with onnxruntime
    pytest.importorskip("openvino")
    exported = fitted_run.parent / "exported"
    assert main(["export", str(fitted_run), "--out", str(exported), "--quiet"]) == 0
    return exported


@pytest.fixture(scope="module", params=["pytorch", "openvino"])
def served(request: pytest.FixtureRequest, fitted_run: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, model folder) of a PatchCore served by ``iadkit serve`` in a child process:
    the saved detector, or its ONNX export run by OpenVINO."""
    served_folder, runtime_flags = fitted_run, ["--device", "cpu"]
    if request.param == "openvino":
        served_folder = request.getfixturevalue("exported_run")
        runtime_flags = ["--runtime", "openvino"]
    with _serve(served_folder, [*runtime_flags, "--max-upload-mb", str(MAX_UPLOAD_MB),
                                "--max-pixels", str(MAX_PIXELS)]) as url:
        yield url, fitted_run / "models" / "alpha"


@contextlib.contextmanager
def _serve(folder: Path, flags: list[str]) -> Iterator[str]:
    """``iadkit serve folder flags`` in a child process on a free loopback port: its URL."""
    port = free_loopback_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "iadkit.cli", "serve", str(folder), "--port", str(port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"iadkit serve exited: {process.stdout.read().decode()}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.3)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict | bytes, dict]:
    """POST and read the answer, also when the server answered (413) and closed before the
    whole body was sent."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", target, body=body, headers={"Content-Type": content_type})
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = connection.getresponse()
    status, raw = response.status, response.read()
    headers = {key.lower(): value for key, value in response.getheaders()}
    connection.close()
    if headers.get("content-type", "").startswith("application/json"):
        return status, json.loads(raw), headers
    return status, raw, headers


def _multipart(data: bytes, filename: str = "part.png", field: str = "file") -> tuple[bytes, str]:
    boundary = "iadkit-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _test_image(toy_root: Path) -> Path:
    return max((toy_root / "alpha" / "test").glob("*/*.png"))


def test_health_and_model_description(served) -> None:
    url, _ = served
    with urllib.request.urlopen(f"{url}/health") as response:
        assert json.loads(response.read()) == {"status": "ok"}
    with urllib.request.urlopen(f"{url}/model") as response:
        model = json.loads(response.read())
    assert model["method"] == "patchcore"
    assert model["input_size"] == 64  # the cpu preset at 64 px, without a centre crop
    assert model["threshold"] is not None and "leave-one-out" in model["threshold_source"]
    assert model["false_positive_rate"]["target"] == 0.01
    assert "at least 230" in model["false_positive_rate"]["warning"]  # 16 normals only
    assert model["training_data"]["n_train_images"] > 0


def test_predict_matches_the_detector_in_process(served, toy_root: Path) -> None:
    url, model_dir = served
    path = _test_image(toy_root)
    body, content_type = _multipart(path.read_bytes(), path.name)
    status, result, _ = _post(f"{url}/predict?heatmap=base64", body, content_type)
    assert status == 200, result
    detector = Detector.load(model_dir, device="cpu")
    expected = float(detector.predict(detector.preprocess.image(read_image(path))[None]).scores[0])
    assert result["score"] == pytest.approx(expected, rel=1e-5)
    assert result["anomalous"] == (expected > detector.calibration.image_threshold)
    # The overlay and the regions are on the uploaded image, in its own pixel coordinates.
    heatmap = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png_base64"])))
    height, width = read_image(path).shape[:2]
    assert heatmap.size == (width, height) == tuple(result["image_size"])
    full = detector.preprocess.map_to_original(
        detector.predict(detector.preprocess.image(read_image(path))[None]).anomaly_maps[0].numpy(),
        height, width)
    expected_regions = find_regions(full, detector.calibration.pixel_threshold)
    assert [tuple(r.values())[:4] for r in result["regions"]] == [r.box for r in expected_regions]

    # The raw body form and the PNG heatmap form give the same score.
    status, png, headers = _post(f"{url}/predict?heatmap=png", path.read_bytes(), "image/png")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert float(headers["x-anomaly-score"]) == pytest.approx(result["score"], rel=1e-5)


@pytest.mark.parametrize(("body", "content_type", "status", "message"), [
    (b"this is not an image", "image/png", 400, "not a readable image"),
    (_png(np.zeros((32, 32, 3), np.uint8))[:60], "image/png", 400, "corrupt or truncated"),
    (b"", "image/png", 400, "empty"),
    (b"{}", "application/json", 415, "content type"),
    (_png(np.zeros((1200, 1000), np.uint8)), "image/png", 413, "pixels"),  # a tiny bomb
    (b"\0" * int(MAX_UPLOAD_MB * 2**20 + 10), "image/png", 413, "larger than"),
])
def test_bad_requests_get_clear_4xx_answers(served, body: bytes, content_type: str,
                                            status: int, message: str) -> None:
    url, _ = served
    got, result, _ = _post(f"{url}/predict", body, content_type)
    assert got == status
    assert message in result["detail"]


def test_multipart_without_the_file_field_and_a_bad_heatmap_mode(served, toy_root: Path) -> None:
    url, _ = served
    body, content_type = _multipart(_test_image(toy_root).read_bytes(), field="image")
    status, result, _ = _post(f"{url}/predict", body, content_type)
    assert status == 400 and "'file'" in result["detail"]
    status, result, _ = _post(f"{url}/predict?heatmap=svg", b"x", "image/png")
    assert status == 400 and "heatmap" in result["detail"]


def test_concurrent_requests_all_succeed_with_the_same_score(served, toy_root: Path) -> None:
    url, _ = served
    data = _test_image(toy_root).read_bytes()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: _post(f"{url}/predict", data, "image/png"), range(16)))
    assert all(status == 200 for status, _, _ in answers)
    assert len({result["score"] for _, result, _ in answers}) == 1
    with urllib.request.urlopen(f"{url}/health") as response:  # still up after everything
        assert response.status == 200


def test_an_oversized_chunked_upload_is_refused_while_streaming(served) -> None:
    """No Content-Length: the limit is enforced on the bytes as they arrive."""
    import http.client

    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (b"\0" * 65536 for _ in range(int(MAX_UPLOAD_MB * 16) + 4))
    try:
        connection.request("POST", "/predict", body=chunks, encode_chunked=True,
                           headers={"Content-Type": "image/png"})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the client finished sending
    response = connection.getresponse()
    assert response.status == 413
    assert "larger than" in json.loads(response.read())["detail"]
    connection.close()


def test_an_export_is_served_without_torch(exported_run: Path, fitted_run: Path,
                                           toy_root: Path) -> None:
    """The scorer of an export imports neither torch nor iadkit's training code, and a saved
    detector cannot be given an ONNX runtime."""
    script = (
        "import sys; from iadkit.deploy.service import load_scorer; "
        f"scorer = load_scorer({str(exported_run)!r}, runtime='openvino'); "
        f"data = open({str(_test_image(toy_root))!r}, 'rb').read(); "
        "result = scorer.score(data, 'part.png', heatmap='png'); "
        "print(result['heatmap_png'][:4] == b'\\x89PNG', 'torch' in sys.modules, "
        "'iadkit.methods' in sys.modules)")
    answer = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True).stdout.split()
    assert answer == ["True", "False", "False"]
    from iadkit.deploy.service import load_scorer
    from iadkit.errors import IadkitError

    with pytest.raises(IadkitError, match="needs an export"):
        load_scorer(fitted_run / "models" / "alpha", runtime="openvino")
    with pytest.raises(IadkitError, match="is an ONNX export, run on the CPU"):
        load_scorer(exported_run, device="cuda")


API_KEY = "k3y-for-tests-0123456789"


@pytest.fixture(scope="module")
def guarded(fitted_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with an API key, one allowed CORS origin, one request at a time, a 2 s body
    timeout and a 1 MiB decoding budget."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# service keys\n{API_KEY}\n")
    with _serve(fitted_run, ["--device", "cpu", "--api-key-file", str(key_file),
                             "--cors-origin", "https://line3.example", "--max-in-flight", "1",
                             "--max-waiting", "0", "--body-timeout", "2",
                             "--max-decoded-mb", "1"]) as url:
        yield url


def _raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    """A socket that has sent ``head`` (request line and headers) and ``body``, still open."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = socket.create_connection((parts.hostname, parts.port), timeout=30)
    connection.sendall(head.encode() + b"\r\n\r\n" + body)
    return connection


def _status(connection: socket.socket) -> tuple[int, bytes]:
    """The status and the whole answer (head and body) read from ``connection``."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = connection.recv(65536)
        if not chunk:
            break
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(answer.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def _keyed(url: str, path: str, key: str | None = API_KEY, **headers: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", headers={
        **({"X-API-Key": key} if key else {}), **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def test_api_key_is_required_except_for_health(guarded: str, toy_root: Path) -> None:
    assert _keyed(guarded, "/health", key=None)[0] == 200
    assert _keyed(guarded, "/model", key=None)[0] == 401
    assert _keyed(guarded, "/model", key="wrong-key-0123456789")[0] == 401
    assert _keyed(guarded, "/model")[0] == 200
    bearer = urllib.request.Request(f"{guarded}/model",
                                    headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(bearer, timeout=30) as response:
        described = json.loads(response.read())
    # nothing of the server's file system
    assert "model_dir" not in described
    assert "location" not in json.dumps(described["training_data"])


def test_docs_are_off_and_cors_allows_only_the_listed_origin(guarded: str) -> None:
    assert _keyed(guarded, "/docs")[0] == 404 and _keyed(guarded, "/openapi.json")[0] == 404
    _, allowed = _keyed(guarded, "/model", Origin="https://line3.example")
    _, other = _keyed(guarded, "/model", Origin="https://elsewhere.example")
    assert allowed.get("access-control-allow-origin") == "https://line3.example"
    assert "access-control-allow-origin" not in {k.lower() for k in other}


def test_decoding_budget_refuses_large_images_before_decoding(guarded: str) -> None:
    big = _png(np.zeros((400, 400), np.uint16))  # 400 x 400 x (2*2 + 6) B = 1.5 MiB > 1 MiB
    connection = _raw_request(guarded, "\r\n".join([
        "POST /predict HTTP/1.1", "Host: x", f"X-API-Key: {API_KEY}",
        "Content-Type: image/png", f"Content-Length: {len(big)}"]), big)
    status, answer = _status(connection)
    connection.close()
    assert status == 413 and b"MiB allowed" in answer


def test_a_stalled_upload_is_dropped_and_a_busy_server_answers_503(guarded: str,
                                                                   toy_root: Path) -> None:
    image = _test_image(toy_root).read_bytes()
    head = "\r\n".join(["POST /predict HTTP/1.1", "Host: x", f"X-API-Key: {API_KEY}",
                        "Content-Type: image/png", f"Content-Length: {len(image)}"])
    # A slow client holds the only slot while its body trickles in ...
    slow = _raw_request(guarded, head, image[:10])
    time.sleep(0.5)
    busy = _raw_request(guarded, head, image)
    status, answer = _status(busy)
    busy.close()
    assert status == 503 and b"retry-after" in answer.lower()
    # ... then stalls: it is answered 408 within the body timeout and its slot is free again.
    started = time.monotonic()
    status, _ = _status(slow)
    slow.close()
    assert status == 408 and time.monotonic() - started < 5
    done = _raw_request(guarded, head, image)
    status, _ = _status(done)
    done.close()
    assert status == 200
