"""Request size and concurrency limits, enforced before a request reaches the queue (ASGI middleware).

Over `serve.max_request_bytes` -> 413, over `serve.max_concurrent` requests in flight -> 429, each with the
OpenAI error body naming the limit; a streamed answer counts as in flight until its last event is sent.
"""

from __future__ import annotations

import json
from typing import Any

from toolkit.serve.errors import RequestError


class Limits:
    def __init__(self, app: Any, max_request_bytes: int, max_concurrent: int, paths: tuple[str, ...]) -> None:
        self.app, self.max_bytes, self.max_concurrent, self.paths = (
            app,
            max_request_bytes,
            max_concurrent,
            paths,
        )
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            await refuse(send, self.too_large())
            return
        if self.in_flight >= self.max_concurrent:
            busy = f"serve.max_concurrent={self.max_concurrent} requests are in flight; retry later"
            await refuse(send, RequestError(busy, None, 429, "too_many_requests"))
            return
        self.in_flight += 1
        try:
            await self.app(scope, self.counted(receive), send)
        except BodyTooLarge:  # raised while the body is read, before any response has started
            await refuse(send, self.too_large())
        finally:
            self.in_flight -= 1

    def too_large(self) -> RequestError:
        return RequestError(f"the request body is over serve.max_request_bytes={self.max_bytes}", "body", 413,
                            "request_too_large")  # fmt: skip

    def counted(self, receive: Any) -> Any:
        """A body sent without Content-Length is counted as it arrives."""
        seen = 0

        async def wrapped() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge
            return message

        return wrapped


class BodyTooLarge(Exception):
    pass


async def refuse(send: Any, err: RequestError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
