"""The service's limits and access settings, in a module of their own: the CLI reads their
defaults to build ``iadkit serve``'s flags without importing FastAPI."""

from __future__ import annotations

from dataclasses import dataclass

from ..validation import Number


@dataclass(frozen=True)
class ServiceSettings:
    """What the service accepts, how much it does at once, and who may call it.

    Attributes:
        max_upload_bytes: a larger request body gets 413 while it streams in.
        max_pixels: a larger image gets 413 before decoding (iadkit's own limit, whatever
            Pillow's default).
        max_decoded_bytes: an image whose decoding would take more memory
            (:func:`~iadkit.data.image_io.decoded_bytes`) gets 413 before decoding.
        max_in_flight: images decoded and scored at once; the service's memory is about its
            model, plus this many times the largest decode, plus the bodies of the admitted
            requests (at most ``max_in_flight + max_waiting`` times ``max_upload_bytes``).
        max_waiting: requests admitted to wait for a slot; beyond them a request gets 503
            with ``Retry-After`` before its body is read.
        body_timeout_s: a request whose whole body has not arrived this long after it began
            (stalled or trickling) gets 408 and its connection is dropped.
        request_timeout_s: a request not answered in this time gets 503.
        api_keys: when given, every endpoint but ``/health`` needs one of them in an
            ``X-API-Key`` header or as ``Authorization: Bearer KEY``.
        cors_origins: origins a browser page may call the service from (none by default).
        docs: serve the interactive API documentation (``/docs``, ``/openapi.json``).
    """

    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_decoded_bytes: int = 600 * 2**20
    max_in_flight: int = 2
    max_waiting: int = 16
    body_timeout_s: float = 30.0
    request_timeout_s: float = 120.0
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    docs: bool = False

    def __post_init__(self) -> None:
        positive_int, positive = Number(int, 1), Number(float, 0, low_open=True)
        for name, rule in (("max_upload_bytes", positive_int), ("max_pixels", positive_int),
                           ("max_decoded_bytes", positive_int), ("max_in_flight", positive_int),
                           ("max_waiting", Number(int, 0)), ("body_timeout_s", positive),
                           ("request_timeout_s", positive)):
            rule.check(name, getattr(self, name))
