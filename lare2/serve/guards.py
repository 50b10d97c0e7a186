"""What the service refuses before reading a request: no token (401), too big (413), no room (503).

Both are plain ASGI middleware in front of the app, so a refused upload is answered from its
headers: a ``Content-Length`` over the limit is a 413 before any byte of the body is read, a body
without one (chunked) is counted as it streams and refused as soon as it passes the limit, and a
scoring request that finds the queue full is a 503 with ``Retry-After`` before its body is read.

Memory: every upload is held in memory until its request is answered, so the bytes of all requests
in flight together are bounded too (``ByteBudget``): a request holds its ``Content-Length`` from
its headers on, or (chunked) its bytes as they stream; one that does not fit is a 503 with
``Retry-After``, from its headers when it declares a length.
"""

from __future__ import annotations

import hmac
import json
from typing import Callable

from fastapi import HTTPException
from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCORE_PATH = "/v1/score"
OPEN_PATHS = frozenset({"/healthz"})
"""Answered without a token: a load balancer's liveness probe carries none."""


async def send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class BearerToken:
    """With a token, every route but ``/healthz`` needs ``Authorization: Bearer <token>`` (401 otherwise)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = (header(scope, b"authorization") or "").encode("latin-1")
        if not hmac.compare_digest(given, self.expected):  # constant time: the token is not guessable byte by byte
            await send_json(send, 401, {"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"},
                            {"WWW-Authenticate": 'Bearer realm="lare2"'})
            return
        await self.app(scope, receive, send)


class ByteBudget:
    """Upload bytes held by all requests at once, at most ``limit``; ``gauge`` shows how many are held."""

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        self.limit, self.held, self.gauge = limit, 0, gauge

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes if they fit (one event loop takes and gives back: no lock)."""
        if self.held + size > self.limit:
            return False
        self.held += size
        self._show()
        return True

    def give_back(self, size: int) -> None:
        self.held -= size
        self._show()

    def _show(self) -> None:
        if self.gauge is not None:
            self.gauge.set(self.held)


class UploadLimits:
    """Scoring requests: 413 over ``max_bytes`` (from Content-Length, else counted), 503 when ``room()`` is False
    or the request's bytes do not fit in ``inflight`` (from Content-Length, else counted as the body streams)."""

    def __init__(self, app: ASGIApp, max_bytes: int, room: Callable[[], bool], retry_after: Callable[[], int],
                 inflight: ByteBudget) -> None:
        self.app, self.max_bytes, self.room, self.retry_after = app, max_bytes, room, retry_after
        self.inflight = inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != SCORE_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if length is not None and length > self.max_bytes:
            await send_json(send, 413, {"detail": self.too_large()}, {"Connection": "close"})
            return
        if not self.room():
            await send_json(send, 503, {"detail": "the scoring queue is full; retry later"},
                            {"Retry-After": str(self.retry_after())})
            return
        if length is not None and not self.inflight.take(length):
            await send_json(send, 503, {"detail": self.busy()}, {"Retry-After": str(self.retry_after())})
            return
        received, held = 0, length or 0

        async def counted_receive() -> Message:
            nonlocal received, held
            message = await receive()
            received += len(message.get("body", b""))
            # an HTTPException here: the app answers it and stops reading the body
            if received > self.max_bytes:
                raise HTTPException(413, self.too_large(), headers={"Connection": "close"})
            if received > held:  # no Content-Length: the body holds its bytes as they come
                if not self.inflight.take(received - held):
                    raise HTTPException(503, self.busy(), headers={"Retry-After": str(self.retry_after()),
                                                                   "Connection": "close"})
                held = received
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            self.inflight.give_back(held)

    def busy(self) -> str:
        return (f"the uploads in flight fill the service's {self.inflight.limit / 2**20:g} MiB "
                "(--max-inflight-mb); retry later")

    def too_large(self) -> str:
        return (f"the upload is over the limit of {self.max_bytes / 2**20:g} MiB (--max-upload-mb); "
                "send fewer or smaller files")
