"""What the service refuses before reading a request: no token (401), too big (413), no room (503).

Both are plain ASGI middleware in front of the app, so a refused upload is answered from its
headers: a ``Content-Length`` over the limit is a 413 before any byte of the body is read, a body
without one (chunked) is counted as it streams and refused as soon as it passes the limit, and a
scoring request that finds the queue full is a 503 with ``Retry-After`` before its body is read.
"""

from __future__ import annotations

import hmac
import json
from typing import Callable

from fastapi import HTTPException
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


class UploadLimits:
    """Scoring requests: 413 over ``max_bytes`` (from Content-Length, else counted), 503 when ``room()`` is False."""

    def __init__(self, app: ASGIApp, max_bytes: int, room: Callable[[], bool], retry_after: Callable[[], int]) -> None:
        self.app, self.max_bytes, self.room, self.retry_after = app, max_bytes, room, retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != SCORE_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json(send, 413, {"detail": self.too_large()}, {"Connection": "close"})
            return
        if not self.room():
            await send_json(send, 503, {"detail": "the scoring queue is full; retry later"},
                            {"Retry-After": str(self.retry_after())})
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # the app answers 413 (an HTTPException) and stops reading
                raise HTTPException(413, self.too_large(), headers={"Connection": "close"})
            return message

        await self.app(scope, counted_receive, send)

    def too_large(self) -> str:
        return (f"the upload is over the limit of {self.max_bytes / 2**20:g} MiB (--max-upload-mb); "
                "send fewer or smaller files")
