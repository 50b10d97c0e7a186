"""Prometheus metrics of the service (``GET /metrics``), in a registry of its own per app.

Requests by route and status, request latency, scoring batch sizes, the queue depth, the upload bytes
in flight and the images scored; the route label is the route's template (``/v1/score``), ``other`` for
unknown paths, so a client cannot grow the label set.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
KNOWN_ROUTES = ("/", "/v1/score", "/v1/info", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")


class ServeMetrics:
    """The service's metrics, registered in ``registry`` (not the process-wide default: one app, one registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lare2_http_requests", "HTTP requests by route and status code.",
                                ("route", "status"), registry=self.registry)
        self.latency = Histogram("lare2_http_request_seconds", "HTTP request latency by route, seconds.",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_images = Histogram("lare2_batch_images", "Images per scoring batch (one model call).",
                                      buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_images = Gauge("lare2_queue_images", "Images waiting for a scoring batch.", registry=self.registry)
        self.inflight_bytes = Gauge("lare2_upload_bytes_in_flight", "Upload bytes held by requests being answered "
                                    "(declared lengths, or counted as bodies stream).", registry=self.registry)
        self.images_scored = Counter("lare2_images_scored", "Images scored, by row status (ok or error).",
                                     ("status",), registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        """(Prometheus text format, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_label(path: str) -> str:
    if path in KNOWN_ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


class MetricsMiddleware:
    """Counts every HTTP answer, including those of the guards in front of the app (401, 413, 503)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500  # an exception before any answer is a 500 to the client

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = route_label(scope["path"])
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
