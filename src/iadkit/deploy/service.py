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

import asyncio
import base64
import hmac
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.requests import ClientDisconnect

from ..calibration import Calibration, decide
from ..data.image_io import decode_image
from ..data.preprocess import Preprocess, predict_by_units
from ..errors import IadkitError, ImageReadError, ImageTooLargeError
from ..overlay import overlay_png
from ..regions import regions_in_original
from .inferencer import CONFIG_FILE as EXPORT_CONFIG_FILE
from .inferencer import TRAINING_SUMMARY_KEYS, OnnxInferencer
from .settings import ServiceSettings

HEATMAP_MODES = ("none", "base64", "png")
#: Units (a tiled image's tiles) run through the model at once: bounds the memory per request.
UNIT_BATCH = 16


class Scorer(ABC):
    """Scores uploads with a model loaded once: decodes them (refusing, before decoding, more
    pixels or more decoding memory than ``settings`` allow), preprocesses, runs the model
    behind a lock, and answers with the decision. Safe to call from several threads."""

    def __init__(self, model_dir: Path, name: str, preprocess: Preprocess,
                 calibration: Calibration | None, settings: ServiceSettings) -> None:
        self.model_dir, self.name, self.settings = model_dir, name, settings
        self.preprocess, self.calibration = preprocess, calibration
        self._lock = threading.Lock()

    @abstractmethod
    def _run(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3, S, S) units of an image -> their (n, S, S) anomaly maps and (n,) scores."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` says."""

    def score(self, data: bytes, name: str, heatmap: str = "none",
              category: str | None = None) -> dict[str, Any]:
        """Decode ``data`` and score it; raises ImageReadError (ImageTooLargeError) for bad
        images. The anomalous regions (at the calibrated pixel threshold) and the heatmap are in
        the uploaded image's own pixel coordinates; ``category`` picks a unified model's
        per-category threshold."""
        settings = self.settings
        image = decode_image(data, name, settings.max_pixels, settings.max_decoded_bytes,
                             keep_gray=True)
        height, width = image.shape[:2]
        with self._lock:
            [(_, anomaly_map, score)] = predict_by_units(
                self.preprocess, [(name, self.preprocess.units(image, eager=False))],
                lambda batch, _: self._run(batch), UNIT_BATCH)
        result = {**asdict(decide(score, self.calibration, category)),
                  "image_size": [int(width), int(height)], "regions": None}
        if self.calibration is not None:
            threshold = self.calibration.for_category(category).pixel_threshold
            result["regions"] = [r.to_dict() for r in regions_in_original(
                anomaly_map, self.preprocess, height, width, threshold)]
        if heatmap != "none":
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            result["heatmap_png"] = overlay_png(image, anomaly_map, self.preprocess,
                                                self.calibration)
        return result

    def _description(self, runtime: str, preset: str | None, params: dict[str, Any] | None,
                     training_data: dict[str, Any]) -> dict[str, Any]:
        """What ``GET /model`` says: nothing of the server's file system (no model folder, no
        weight file location)."""
        calibration = self.calibration
        training_data = dict(training_data)
        if isinstance(training_data.get("backbone_weights"), dict):
            weights = training_data["backbone_weights"]
            training_data["backbone_weights"] = {"source": weights.get("source"),
                                                 "sha256": weights.get("sha256")}
        params = {k: v for k, v in (params or {}).items()
                  if k not in ("backbone_weights", "texture_dir", "base_checkpoint")}
        return {"method": self.name, "preset": preset, "params": params,
                "input_size": self.preprocess.output_size,
                "threshold": calibration.image_threshold if calibration else None,
                "threshold_source": calibration.source if calibration else None,
                "false_positive_rate": {
                    "target": calibration.target_fpr, "expected": calibration.fpr_expected,
                    "interval": list(calibration.fpr_interval),
                    "confidence": calibration.confidence, "warning": calibration.warning,
                } if calibration else None,
                "training_data": training_data, "runtime": runtime}


class DetectorScorer(Scorer):
    """A saved detector run by PyTorch. It leaves torch's thread settings as they are
    (``iadkit serve --threads`` sets them for its own process).

    Args:
        model_dir: a saved detector's folder.
        device: overrides the saved device ("cpu", "cuda", ...).
        settings: limits and access (:class:`ServiceSettings`).
        accept_backbone_change: load although the backbone weights found here differ from
            those the detector was fitted with (their SHA-256 is checked).
        precision: overrides the saved precision of the networks ("f32" or "bf16").
    """

    def __init__(self, model_dir: str | Path, device: str | None = None,
                 settings: ServiceSettings | None = None,
                 accept_backbone_change: bool = False, precision: str | None = None) -> None:
        from ..methods import Detector

        self.detector = Detector.load(model_dir, device=device,
                                      accept_backbone_change=accept_backbone_change,
                                      precision=precision)
        super().__init__(Path(model_dir), self.detector.name, self.detector.preprocess,
                         self.detector.calibration, settings or ServiceSettings())

    def _run(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prediction = self.detector.predict(units)
        return prediction.anomaly_maps.numpy(), prediction.scores.numpy()

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
        settings: limits and access (:class:`ServiceSettings`).
        precision: OpenVINO's "f32", "bf16" or "int8" (see :class:`OnnxInferencer`).
    """

    def __init__(self, export_dir: str | Path, runtime: str = "onnxruntime",
                 threads: int | None = None, settings: ServiceSettings | None = None,
                 precision: str = "f32") -> None:
        self.inferencer = OnnxInferencer(export_dir, threads, runtime, precision)
        super().__init__(Path(export_dir), str(self.inferencer.config["method"]),
                         self.inferencer.preprocess, self.inferencer.calibration,
                         settings or ServiceSettings())

    def _run(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.inferencer.run(units)

    def describe(self) -> dict[str, Any]:
        config = self.inferencer.config
        return self._description(self.inferencer.runtime, config.get("preset"),
                                 config.get("params"), config.get("training_data", {}))


def load_scorer(model_dir: str | Path, device: str | None = None, runtime: str | None = None,
                threads: int | None = None, settings: ServiceSettings | None = None,
                accept_backbone_change: bool = False, precision: str | None = None) -> Scorer:
    """The scorer for a saved detector's folder (PyTorch) or an export's folder (``runtime``,
    default onnxruntime, openvino for ``precision`` int8, with ``threads`` intra-op threads of
    its own)."""
    model_dir = Path(model_dir)
    if (model_dir / EXPORT_CONFIG_FILE).is_file():
        if device not in (None, "cpu"):
            raise IadkitError(f"{model_dir} is an ONNX export, run on the CPU; --device "
                              f"{device} applies to saved detectors only")
        runtime = runtime or ("openvino" if precision == "int8" else "onnxruntime")
        return ExportedScorer(model_dir, runtime, threads, settings, precision or "f32")
    if precision == "int8":
        raise IadkitError(f"{model_dir} is a saved detector, run by PyTorch in f32 or bf16; "
                          "--precision int8 needs an OpenVINO export (iadkit export --format "
                          "openvino --precision int8)")
    if runtime is not None:
        raise IadkitError(f"{model_dir} is a saved detector, run by PyTorch; --runtime "
                          f"{runtime} needs an export (iadkit export {model_dir} --out DIR)")
    if threads is not None:
        raise IadkitError("threads applies to an export's runtime; a saved detector runs with "
                          "torch's process-wide setting (torch.set_num_threads, or iadkit serve "
                          "--threads)")
    return DetectorScorer(model_dir, device, settings, accept_backbone_change, precision)


class RequestGuard:
    """ASGI middleware in front of every request: the API key (when keys are set), the body
    size (413 as soon as it passes ``max_upload_bytes``, by its Content-Length or while it
    streams in, so an oversized upload is never buffered) and the body's pace (408 when it has
    not all arrived ``body_timeout_s`` after the request began, so stalled or trickling
    uploads do not hold the server)."""

    def __init__(self, app: Any, settings: ServiceSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if (self.settings.api_keys and scope.get("path") != "/health"
                and not self._authorised(headers)):
            await _answer(send, 401, "a valid API key is needed (X-API-Key header or "
                          "Authorization: Bearer)", {"www-authenticate": "Bearer"})
            return
        max_bytes = self.settings.max_upload_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await _answer(send, 413, f"request body larger than {max_bytes} bytes")
            return
        received = 0
        started = False
        deadline = asyncio.get_running_loop().time() + self.settings.body_timeout_s

        async def guarded_receive() -> dict:
            nonlocal received
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.0))
            except asyncio.TimeoutError:
                raise _Refusal(408, f"the request body did not arrive within "
                               f"{self.settings.body_timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _Refusal(413, f"request body larger than {max_bytes} bytes")
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _Refusal as refusal:
            if not started:
                await _answer(send, refusal.status, refusal.detail, {"connection": "close"})

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        offered = headers.get(b"x-api-key", b"")
        authorization = headers.get(b"authorization", b"")
        if not offered and authorization[:7].lower() == b"bearer ":
            offered = authorization[7:].strip()
        # Compared with every key in constant time, whichever matches.
        matches = [hmac.compare_digest(offered, key.encode()) for key in self.settings.api_keys]
        return bool(offered) and any(matches)


class _Refusal(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


async def _answer(send: Any, status: int, detail: str,
                  headers: dict[str, str] | None = None) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await response({"type": "http"}, None, send)


class Admission:
    """Counts the requests admitted to be scored (in flight or waiting for a slot) and refuses
    more than ``limit`` at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._admitted = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self._admitted >= self.limit:
                return False
            self._admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._admitted -= 1


def create_app(model_dir: str | Path, device: str | None = None, runtime: str | None = None,
               threads: int | None = None, settings: ServiceSettings | None = None,
               accept_backbone_change: bool = False, precision: str | None = None) -> FastAPI:
    """The FastAPI application serving the detector saved in ``model_dir``, or the ONNX export
    there (run by ``runtime`` in ``precision``), within ``settings`` (:class:`ServiceSettings`)."""
    settings = settings or ServiceSettings()
    scorer = load_scorer(model_dir, device, runtime, threads, settings,
                         accept_backbone_change, precision)
    # iadkit applies max_pixels itself, before decoding; Pillow's own process-wide limit
    # (89 M pixels) would otherwise cap it silently.
    Image.MAX_IMAGE_PIXELS = None
    app = FastAPI(title="iadkit", summary=f"{scorer.name} anomaly detector",
                  docs_url="/docs" if settings.docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if settings.docs else None)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(RequestGuard, settings=settings)
    admission = Admission(settings.max_in_flight + settings.max_waiting)
    slots = asyncio.Semaphore(settings.max_in_flight)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return scorer.describe()

    async def read_upload(request: Request) -> tuple[bytes, str]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "send the image as a form field named 'file'")
            return await upload.read(), upload.filename or "upload"
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return await request.body(), "upload"
        raise HTTPException(415, f"content type {content_type or 'missing'!r}: send an "
                            "image/* body or a multipart form with a 'file' field")

    async def read_and_score(request: Request, heatmap: str, category: str | None
                             ) -> dict[str, Any]:
        # The body is read as soon as the request is admitted, so that its timeout runs
        # from the start; decoding and scoring wait for one of the slots.
        try:
            data, name = await read_upload(request)
        except ClientDisconnect:
            raise HTTPException(400, "the client went away before sending the whole body"
                                ) from None
        async with slots:
            try:
                return await run_in_threadpool(scorer.score, data, name, heatmap, category)
            except ImageTooLargeError as error:
                raise HTTPException(413, str(error)) from None
            except ImageReadError as error:
                raise HTTPException(400, str(error)) from None

    @app.post("/predict")
    async def predict(request: Request, heatmap: str = "none", category: str | None = None
                      ) -> Any:
        if heatmap not in HEATMAP_MODES:
            raise HTTPException(400, f"heatmap must be one of {list(HEATMAP_MODES)}")
        # Admitted before the body is read: a refused request costs no memory.
        if not admission.enter():
            raise HTTPException(503, f"busy: {admission.limit} requests are being scored or "
                                "waiting; try again shortly", headers={"Retry-After": "1"})
        try:
            result = await asyncio.wait_for(read_and_score(request, heatmap, category),
                                            settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"not answered within {settings.request_timeout_s:g} s",
                                headers={"Retry-After": "5"}) from None
        finally:
            admission.leave()
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
