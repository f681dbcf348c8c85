"""The one ASGI middleware in front of the API: what a request must be before the service parses
it, who may make it, and what happens when its client leaves.

- With an API key (``T2I_API_KEY``, or a file), every POST and ``GET /info`` need
  ``Authorization: Bearer KEY``; others get 401 in OpenAI's error shape. Keys are compared as
  SHA-256 digests with ``hmac.compare_digest`` (constant time). The probes (/healthz /livez /readyz),
  /metrics and the API docs stay open.
- POST bodies are JSON only: any other Content-Type is 415 before a byte of the body is read (so a
  web page cannot start generations in a visitor's browser with a form or text/plain post, which
  skip the CORS preflight).
- A body over ``max_body_bytes`` is 413 (from Content-Length at once, or counted as it streams); a
  body that does not arrive within ``body_timeout_s`` is 408, so a client that sends headers and
  stalls cannot hold a request slot for long.
- A client that disconnects before its answer cancels its request: the handler's task is
  cancelled (the service then tells the model to drop the work) and its slot is free at once.

Refusals are logged as one line each, never a traceback.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging

OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics", "/", "/docs.json", "/schema.json"})
log = logging.getLogger("bentoml.t2i")  # BentoML's handlers print it in the server's log


def openai_error(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    """An error body in OpenAI's shape, which its SDKs parse into their exceptions."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def reply(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class RequestGuard:
    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, api_key: str | None = None,
                 protected_gets: tuple[str, ...] = ("/info",)) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.key_digest = _digest(api_key) if api_key else None
        self.protected_gets = frozenset(protected_gets)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        if self.key_digest is not None and path not in OPEN_PATHS and (method == "POST" or path in self.protected_gets):
            if not self._authorized(headers.get("authorization", "")):
                return await self._refuse(send, path, 401, openai_error(
                    "Missing or incorrect API key: send the header 'Authorization: Bearer KEY'", "invalid_api_key"),
                    [(b"www-authenticate", b'Bearer realm="t2i"')])
        if method != "POST":
            return await self.app(scope, receive, send)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return await self._refuse(send, path, 415, openai_error(
                f"Content-Type must be application/json (got {ctype[:60] or 'none'!r})", "unsupported_media_type"))
        length = headers.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit()):
            return await self._refuse(send, path, 400, openai_error("malformed Content-Length", "invalid_request"))
        if length is not None and int(length[:20]) > self.max_body_bytes:
            return await self._too_large(send, path)
        body = await self._read_body(receive)
        if body is None:
            log.info("client left before its request arrived: %s dropped", path)
            return await self._abandon(send)
        if isinstance(body, int):
            if body == 413:
                return await self._too_large(send, path)
            return await self._refuse(send, path, 408, openai_error(
                f"the request body did not arrive within {self.body_timeout_s:g} s", "request_timeout"),
                [(b"connection", b"close")])
        await self._run(scope, receive, send, body, path)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return hmac.compare_digest(_digest(token.strip() if scheme.lower() == "bearer" else ""), self.key_digest)

    async def _read_body(self, receive) -> bytes | int | None:
        """The whole body; 413 or 408 (as an int) when too large or too slow; None on disconnect."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return 408
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return 413
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    async def _run(self, scope, receive, send, body: bytes, path: str) -> None:
        """Runs the app on the buffered body while watching the connection; a disconnect cancels it."""
        first, left, finished = True, asyncio.Event(), False

        async def replay():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def tracked_send(msg):
            nonlocal finished
            if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                finished = True
            await send(msg)

        app = asyncio.ensure_future(self.app(scope, replay, tracked_send))
        watcher = asyncio.ensure_future(receive())  # returns http.disconnect when the client goes
        try:
            await asyncio.wait({app, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            app.cancel()
            watcher.cancel()
            raise
        if not app.done() and not finished and watcher.result()["type"] == "http.disconnect":
            left.set()
            app.cancel()
            await asyncio.gather(app, return_exceptions=True)
            log.info("client left before its answer: %s cancelled", path)
            return await self._abandon(send)
        watcher.cancel()
        await app

    async def _abandon(self, send) -> None:
        # nothing reaches a client that left; the reply only ends the exchange for the layers around
        # this one (BentoML's timeout middleware waits for a response to start)
        await reply(send, 499, openai_error("client closed the request", "client_closed_request"))

    async def _too_large(self, send, path: str) -> None:
        await self._refuse(send, path, 413, openai_error(
            f"request body larger than {self.max_body_bytes} bytes", "request_too_large"), [(b"connection", b"close")])

    async def _refuse(self, send, path: str, status: int, body: dict, headers=()) -> None:
        log.info("%s on %s: %s", status, path, body["error"]["message"])
        await reply(send, status, body, list(headers))
