"""An HTTP service around one saved detector or one ONNX export (FastAPI; run it with
``iadkit serve MODEL``).

A saved detector is run by PyTorch. An export (the folder ``iadkit export`` wrote) is run by
onnxruntime or OpenVINO without importing torch, which is the faster and lighter choice on a
production CPU (docs/deployment.md has the measured figures).

Endpoints:

- ``POST /predict``: an image, as a multipart form field ``file`` or as the raw body with an
  ``image/*`` content type. Returns JSON with the image score, the normalised score and the
  decision (when the model was calibrated), the threshold and where it came from, and the
  anomalous regions at the calibrated pixel threshold (bounding boxes, area and peak, in the
  uploaded image's pixel coordinates); with ``?heatmap=base64`` also the anomaly-map overlay on
  the uploaded image (its own width and height; the area the model did not see hatched) as a
  base64 PNG, with ``?heatmap=png`` the overlay itself (``image/png``, score and decision in
  ``X-Anomaly-*`` headers). ``?category=NAME`` uses a unified model's per-category threshold.
- ``GET /health``: ``{"status": "ok"}`` once the model is loaded.
- ``GET /model``: method, preset, hyperparameters, input size, threshold and its origin, and a
  summary of the training data.

Bad requests get a 4xx with a message, never a 500: a body over ``max_upload_bytes`` gets 413
(checked while it streams in, so it is never held in memory), an image over ``max_pixels``
pixels gets 413 before it is decoded (decompression bombs), a wrong content type 415, a corrupt,
truncated or non-image upload 400. The model is loaded once; requests are decoded concurrently
and predicted one batch at a time behind a lock.

Example:
    >>> app = create_app("runs/patchcore/models/tiles")
    >>> app = create_app("exported/tiles", runtime="openvino")
    >>> import uvicorn; uvicorn.run(app, port=8000)
"""

from __future__ import annotations

import base64
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from ..calibration import Calibration, decide
from ..data.image_io import decode_image
from ..data.preprocess import Preprocess
from ..errors import IadkitError, ImageReadError, ImageTooLargeError
from ..overlay import overlay_png
from ..regions import find_regions
from .inferencer import CONFIG_FILE as EXPORT_CONFIG_FILE
from .inferencer import TRAINING_SUMMARY_KEYS, OnnxInferencer

HEATMAP_MODES = ("none", "base64", "png")


class Scorer(ABC):
    """Scores uploads with a model loaded once: decodes them (refusing more than
    ``max_pixels`` pixels before decoding), preprocesses, runs the model behind a lock, and
    answers with the decision. Safe to call from several threads."""

    def __init__(self, model_dir: Path, name: str, preprocess: Preprocess,
                 calibration: Calibration | None, max_pixels: int) -> None:
        self.model_dir, self.name, self.max_pixels = model_dir, name, max_pixels
        self.preprocess, self.calibration = preprocess, calibration
        self._lock = threading.Lock()

    @abstractmethod
    def _run(self, image: np.ndarray) -> tuple[float, np.ndarray]:
        """(3, S, S) preprocessed image -> (score, (S, S) anomaly map)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` says."""

    def score(self, data: bytes, name: str, heatmap: str = "none",
              category: str | None = None) -> dict[str, Any]:
        """Decode ``data`` and score it; raises ImageReadError (ImageTooLargeError) for bad
        images. The anomalous regions (at the calibrated pixel threshold) and the heatmap are in
        the uploaded image's own pixel coordinates; ``category`` picks a unified model's
        per-category threshold."""
        image = decode_image(data, name, self.max_pixels)
        preprocessed = self.preprocess.image_array(image)
        with self._lock:
            score, anomaly_map = self._run(preprocessed)
        height, width = image.shape[:2]
        result = {**asdict(decide(score, self.calibration, category)),
                  "image_size": [int(width), int(height)], "regions": None}
        if self.calibration is not None:
            threshold = self.calibration.for_category(category).pixel_threshold
            full = self.preprocess.map_to_original(anomaly_map, height, width)
            result["regions"] = [r.to_dict() for r in find_regions(full, threshold)]
        if heatmap != "none":
            result["heatmap_png"] = overlay_png(image, anomaly_map, self.preprocess,
                                                self.calibration)
        return result

    def _description(self, runtime: str, preset: str | None, params: dict[str, Any] | None,
                     training_data: dict[str, Any]) -> dict[str, Any]:
        calibration = self.calibration
        return {"method": self.name, "preset": preset, "params": params,
                "input_size": self.preprocess.output_size,
                "threshold": calibration.image_threshold if calibration else None,
                "threshold_source": calibration.source if calibration else None,
                "false_positive_rate": {
                    "target": calibration.target_fpr, "expected": calibration.fpr_expected,
                    "interval": list(calibration.fpr_interval),
                    "confidence": calibration.confidence, "warning": calibration.warning,
                } if calibration else None,
                "training_data": training_data, "model_dir": str(self.model_dir),
                "runtime": runtime}


class DetectorScorer(Scorer):
    """A saved detector run by PyTorch. It leaves torch's thread settings as they are
    (``iadkit serve --threads`` sets them for its own process).

    Args:
        model_dir: a saved detector's folder.
        device: overrides the saved device ("cpu", "cuda", ...).
        max_pixels: larger images are refused before decoding.
    """

    def __init__(self, model_dir: str | Path, device: str | None = None,
                 max_pixels: int = 40_000_000) -> None:
        from ..methods import Detector

        self.detector = Detector.load(model_dir, device=device)
        super().__init__(Path(model_dir), self.detector.name, self.detector.preprocess,
                         self.detector.calibration, max_pixels)

    def _run(self, image: np.ndarray) -> tuple[float, np.ndarray]:
        prediction = self.detector.predict(image[None])
        return float(prediction.scores[0]), prediction.anomaly_maps[0].numpy()

    def describe(self) -> dict[str, Any]:
        fit_info = self.detector.fit_info_ or {}
        return self._description("pytorch", self.detector.preset, self.detector.get_params(),
                                 {key: fit_info[key] for key in TRAINING_SUMMARY_KEYS
                                  if key in fit_info})


class ExportedScorer(Scorer):
    """An ONNX export (``iadkit export``) run by onnxruntime or OpenVINO, without torch.

    Args:
        export_dir: the folder holding ``model.onnx`` and ``inference.json``.
        runtime: "onnxruntime" or "openvino" (see :class:`OnnxInferencer`).
        threads: the runtime's intra-op threads (None: all cores).
        max_pixels: larger images are refused before decoding.
    """

    def __init__(self, export_dir: str | Path, runtime: str = "onnxruntime",
                 threads: int | None = None, max_pixels: int = 40_000_000) -> None:
        self.inferencer = OnnxInferencer(export_dir, threads, runtime)
        super().__init__(Path(export_dir), str(self.inferencer.config["method"]),
                         self.inferencer.preprocess, self.inferencer.calibration, max_pixels)

    def _run(self, image: np.ndarray) -> tuple[float, np.ndarray]:
        maps, scores = self.inferencer.run(image[None])
        return float(scores[0]), maps[0]

    def describe(self) -> dict[str, Any]:
        config = self.inferencer.config
        return self._description(self.inferencer.runtime, config.get("preset"),
                                 config.get("params"), config.get("training_data", {}))


def load_scorer(model_dir: str | Path, device: str | None = None, runtime: str | None = None,
                threads: int | None = None, max_pixels: int = 40_000_000
                ) -> Scorer:
    """The scorer for a saved detector's folder (PyTorch) or an export's folder (``runtime``,
    default onnxruntime, with ``threads`` intra-op threads of its own)."""
    model_dir = Path(model_dir)
    if (model_dir / EXPORT_CONFIG_FILE).is_file():
        if device not in (None, "cpu"):
            raise IadkitError(f"{model_dir} is an ONNX export, run on the CPU; --device "
                              f"{device} applies to saved detectors only")
        return ExportedScorer(model_dir, runtime or "onnxruntime", threads, max_pixels)
    if runtime is not None:
        raise IadkitError(f"{model_dir} is a saved detector, run by PyTorch; --runtime "
                          f"{runtime} needs an export (iadkit export {model_dir} --out DIR)")
    if threads is not None:
        raise IadkitError("threads applies to an export's runtime; a saved detector runs with "
                          "torch's process-wide setting (torch.set_num_threads, or iadkit serve "
                          "--threads)")
    return DetectorScorer(model_dir, device, max_pixels)


class BodyLimit:
    """ASGI middleware: answer 413 as soon as a request body passes ``max_bytes`` (by its
    Content-Length, or while it streams in), so an oversized upload is never buffered."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        response = JSONResponse({"detail": f"request body larger than {self.max_bytes} bytes"},
                                status_code=413)
        await response({"type": "http"}, None, send)


class _BodyTooLarge(Exception):
    pass


def create_app(model_dir: str | Path, device: str | None = None,
               max_upload_bytes: int = 20 * 2**20, max_pixels: int = 40_000_000,
               runtime: str | None = None, threads: int | None = None) -> FastAPI:
    """The FastAPI application serving the detector saved in ``model_dir``, or the ONNX export
    there (run by ``runtime``)."""
    scorer = load_scorer(model_dir, device, runtime, threads, max_pixels)
    app = FastAPI(title="iadkit", summary=f"{scorer.name} anomaly detector")
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return scorer.describe()

    @app.post("/predict")
    async def predict(request: Request, heatmap: str = "none", category: str | None = None
                      ) -> Any:
        if heatmap not in HEATMAP_MODES:
            raise HTTPException(400, f"heatmap must be one of {list(HEATMAP_MODES)}")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "send the image as a form field named 'file'")
            data, name = await upload.read(), upload.filename or "upload"
        elif content_type.startswith("image/") or content_type == "application/octet-stream":
            data, name = await request.body(), "upload"
        else:
            raise HTTPException(415, f"content type {content_type or 'missing'!r}: send an "
                                "image/* body or a multipart form with a 'file' field")
        try:
            result = await run_in_threadpool(scorer.score, data, name, heatmap, category)
        except ImageTooLargeError as error:
            raise HTTPException(413, str(error)) from None
        except ImageReadError as error:
            raise HTTPException(400, str(error)) from None
        png = result.pop("heatmap_png", None)
        if heatmap == "png":
            headers = {"X-Anomaly-Score": f"{result['score']:.6g}"}
            if result["anomalous"] is not None:
                headers["X-Anomalous"] = str(result["anomalous"]).lower()
                headers["X-Anomaly-Threshold"] = f"{result['threshold']:.6g}"
            return Response(png, media_type="image/png", headers=headers)
        if png is not None:
            result["heatmap_png_base64"] = base64.b64encode(png).decode()
        return JSONResponse(result)

    return app
