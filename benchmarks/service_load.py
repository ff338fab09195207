"""The HTTP service under a bounded loopback load, next to in-process inference, and under
memory pressure.

Fits a PatchCore (cpu preset) on Magnetic Tile normals (``--train`` images) and exports it to
ONNX. For the saved detector (PyTorch) and for the export on each installed runtime
(onnxruntime, OpenVINO), starts ``iadkit serve`` on a free loopback port and prints two JSON
lines:

- ``service_load``: ``--requests`` uploads of Magnetic Tile test images from ``--clients``
  concurrent clients: requests/second, p50/p99 latency, and the in-process
  ``Detector.predict`` time for one image (decoding included in both);
- ``service_memory``: ``--big-requests`` uploads of a small PNG (``--big-side`` squared 16-bit
  pixels, 36 M by default: about 70 KB on the wire) from ``--big-clients`` concurrent
  clients: the statuses, p50/p99, the server's resident memory before and at its peak
  (VmHWM), then ``--stalled`` uploads that send their headers and a few bytes and stall: how
  many the server still holds open ``--stall-wait`` seconds later.

    .venv/bin/python benchmarks/service_load.py [--requests 200 --clients 4]
        [--big-clients 16 --big-requests 32]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from iadkit.cli import main as iadkit
    from iadkit.data import read_image
    from iadkit.methods import Detector

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--big-side", type=int, default=6000)
    parser.add_argument("--big-clients", type=int, default=16)
    parser.add_argument("--big-requests", type=int, default=32)
    parser.add_argument("--stalled", type=int, default=20)
    parser.add_argument("--stall-wait", type=float, default=35.0,
                        help="seconds to wait before counting stalled uploads still held "
                        "(the service drops them after its body timeout, 30 s by default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "data" / "tiles"
        good = sorted((Path(args.data) / "train" / "good").iterdir())[:args.train]
        (data / "train" / "good").mkdir(parents=True)
        for path in good:
            (data / "train" / "good" / path.name).symlink_to(path.resolve())
        (data / "test").symlink_to((Path(args.data) / "test").resolve())
        run = Path(scratch) / "run"
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only JSON lines
            iadkit(["fit", "--method", "patchcore", "--data", str(data.parent), "--out", str(run),
                    "--device", "cpu", "--quiet"])
        images = sorted(p for p in (Path(args.data) / "test").glob("*/*")
                        if p.suffix.lower() in (".png", ".jpg", ".bmp"))[:50]
        bodies = [path.read_bytes() for path in images]

        detector = Detector.load(run / "models" / "tiles", device="cpu")
        detector.predict(detector.preprocess.image(read_image(images[0]))[None])
        started = time.perf_counter()
        for path in images:
            detector.predict(detector.preprocess.image(read_image(path))[None])
        in_process_ms = 1000 * (time.perf_counter() - started) / len(images)

        exported = Path(scratch) / "exported"
        with contextlib.redirect_stdout(sys.stderr):
            iadkit(["export", str(run), "--out", str(exported), "--quiet"])
        served = [("pytorch", run, ["--device", "cpu"])] + [
            (runtime, exported, ["--runtime", runtime]) for runtime in ("onnxruntime", "openvino")
            if importlib.util.find_spec(runtime)]
        big = _big_png(args.big_side)
        for runtime, folder, flags in served:
            with serving(folder, flags) as (url, pid):
                memory = memory_test(url, pid, big, args.big_requests, args.big_clients)
                memory.update(stalled_test(url, args.stalled, args.stall_wait))
            print(json.dumps({"benchmark": "service_memory", "method": "patchcore",
                              "runtime": runtime, "image_pixels": args.big_side ** 2,
                              "image_bytes": len(big), **memory}), flush=True)
            with serving(folder, flags) as (url, _):
                latencies, elapsed = load_test(url, bodies, args.requests, args.clients)
            print(json.dumps({
                "benchmark": "service_load", "method": "patchcore", "runtime": runtime,
                "requests": args.requests, "clients": args.clients,
                "requests_per_second": round(args.requests / elapsed, 2),
                "p50_ms": round(statistics.median(latencies), 1),
                "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                                1),
                "in_process_ms_per_image": round(in_process_ms, 1),
            }), flush=True)


@contextlib.contextmanager
def serving(folder: Path, flags: list[str]) -> Iterator[tuple[str, int]]:
    """``iadkit serve folder`` on a free loopback port: (URL, process id)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "iadkit.cli", "serve", str(folder),
                               "--port", str(port), *flags])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


def _post(url: str, body: bytes) -> tuple[int, float]:
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST",
                                     headers={"Content-Type": "image/png"})
    sent = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return status, 1000 * (time.perf_counter() - sent)


def load_test(url: str, bodies: list[bytes], requests: int, clients: int
              ) -> tuple[list[float], float]:
    """``requests`` uploads from ``clients`` threads: the sorted latencies in ms and the
    seconds the whole load took."""
    _post(url, bodies[0])
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = sorted(ms for _, ms in pool.map(
            lambda index: _post(url, bodies[index % len(bodies)]), range(requests)))
    return latencies, time.perf_counter() - started


def _rss_gb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 2**20, 2)
    return float("nan")


def _big_png(side: int) -> bytes:
    """A 16-bit grayscale PNG of side x side pixels with a faint gradient (compresses well,
    decodes large)."""
    row = (np.arange(side, dtype=np.uint32) * 7 % 65536).astype(np.uint16)
    image = Image.fromarray(np.broadcast_to(row, (side, side)).copy())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def memory_test(url: str, pid: int, body: bytes, requests: int, clients: int
                ) -> dict[str, object]:
    """Statuses, latencies and the server's memory under concurrent large decodes."""
    before = _rss_gb(pid, "VmRSS")
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(lambda _: _post(url, body), range(requests)))
    latencies = sorted(ms for _, ms in answers)
    return {"clients": clients, "requests": requests,
            "statuses": dict(collections.Counter(str(status) for status, _ in answers)),
            "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
            "rss_before_gb": before, "peak_rss_gb": _rss_gb(pid, "VmHWM")}


def stalled_test(url: str, count: int, wait: float) -> dict[str, object]:
    """Open ``count`` uploads that stall after a few bytes; how many are still held after
    ``wait`` seconds."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    sockets = []
    for _ in range(count):
        connection = socket.create_connection((parts.hostname, parts.port), timeout=5)
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                           b"Content-Length: 100000\r\n\r\n" + b"\x89PNG")
        sockets.append(connection)
    time.sleep(wait)
    held = 0
    for connection in sockets:
        connection.setblocking(False)
        try:
            connection.recv(1)  # an answer or a close: the server let go of it
        except BlockingIOError:
            held += 1  # nothing yet: still held
        except OSError:
            pass
        connection.close()
    return {"stalled_uploads": count, "still_held_after_s": wait, "still_held": held}


if __name__ == "__main__":
    main()
