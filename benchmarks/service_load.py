"""The HTTP service under a bounded loopback load, next to in-process inference.

Fits a PatchCore (cpu preset) on Magnetic Tile normals (``--train`` images) and exports it to
ONNX. For the saved detector (PyTorch) and for the export on each installed runtime
(onnxruntime, OpenVINO), starts ``iadkit serve`` on a free loopback port, sends ``--requests``
image uploads from ``--clients`` concurrent clients, and prints one JSON line: requests/second,
p50/p99 latency, and the in-process ``Detector.predict`` time for one image (decoding included
in both).

    .venv/bin/python benchmarks/service_load.py [--requests 200 --clients 4]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
        for runtime, folder, flags in served:
            latencies, elapsed = load_test(folder, flags, bodies, args.requests, args.clients)
            print(json.dumps({
                "benchmark": "service_load", "method": "patchcore", "runtime": runtime,
                "requests": args.requests, "clients": args.clients,
                "requests_per_second": round(args.requests / elapsed, 2),
                "p50_ms": round(statistics.median(latencies), 1),
                "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                                1),
                "in_process_ms_per_image": round(in_process_ms, 1),
            }), flush=True)


def load_test(folder: Path, flags: list[str], bodies: list[bytes], requests: int,
              clients: int) -> tuple[list[float], float]:
    """Serve ``folder`` and send it ``requests`` uploads from ``clients`` threads: the sorted
    latencies in ms and the seconds the whole load took."""
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

        def send(index: int) -> float:
            request = urllib.request.Request(
                f"{url}/predict", data=bodies[index % len(bodies)], method="POST",
                headers={"Content-Type": "image/png"})
            sent = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as response:
                response.read()
            return 1000 * (time.perf_counter() - sent)

        send(0)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            latencies = sorted(pool.map(send, range(requests)))
        return latencies, time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
