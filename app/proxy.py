"""One port for everything: the viser viewer reached through the page's own server.

A Hugging Face Space exposes a single port, so the page's server also forwards ``/viewer/``
(viser's client, HTTP) and ``/viewer`` (its websocket, where viser's client connects: the page's
URL with ``ws://`` and no trailing slash) to the viser server on its local port. A visitor's own
viewer lives at ``/viewer/k/<key>/`` (its websocket at ``/viewer/k/<key>``): the key reaches the
viser server in the websocket's path and tells it whose runs to follow.

Every page of the viewer is sent with a Content-Security-Policy that allows viser's own boot script
(by its hash) and nothing inline besides: a prompt's ``<script>``, ``<iframe srcdoc>`` or ``onerror``
cannot run even if it ever reached the page unescaped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re

import fastapi
import httpx
import websockets
from fastapi import Request, WebSocket, WebSocketDisconnect
from fastapi.responses import RedirectResponse, Response

VIEWER_PATH = "/viewer"
#: the viewer's page relative to the app's root (what the page embeds)
VIEWER_PAGE = VIEWER_PATH.lstrip("/") + "/"
#: viser's own limit for one websocket message (a background image, a scene)
MAX_MESSAGE = 50 * 1024 * 1024
#: response headers passed through from viser's HTTP server (asked for uncompressed content)
PASSED_HEADERS = ("content-type",)
#: a visitor's key in the viewer's path
VIEWER_KEY = r"[0-9a-f]{16,64}"
INLINE_SCRIPT = re.compile(rb"<script(?:\s[^>]*)?>(.*?)</script>", re.DOTALL)


def content_security_policy(page: bytes) -> str:
    """The policy for one of viser's pages: its inline boot scripts by hash ('strict-dynamic' lets
    the module they create run), WebAssembly (its decompressor), images from data and blob URLs,
    connections to the page's own origin; no other script, no frames, no plugins."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'" for body in INLINE_SCRIPT.findall(page))
    return ("default-src 'self'; "
            f"script-src {hashes} 'strict-dynamic' 'wasm-unsafe-eval'; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
            "connect-src 'self' ws: wss: data: blob:; worker-src 'self' blob:; "
            "frame-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")


def add_viewer_proxy(app: fastapi.FastAPI, viewer_port: int, path: str = VIEWER_PATH) -> None:
    """Forward ``path`` + ``/...`` (HTTP) and the websocket at ``path`` to viser on
    127.0.0.1:``viewer_port``. Call before the app serves its first request."""
    upstream_http = f"http://127.0.0.1:{viewer_port}"
    upstream_ws = f"ws://127.0.0.1:{viewer_port}"

    @app.get(path, include_in_schema=False)
    async def viewer_root(request: Request):
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{request.scope.get('root_path', '')}{path}/{query}")

    async def forward(rest: str) -> Response:
        headers = {"accept-encoding": "identity"}
        try:
            async with httpx.AsyncClient(timeout=30.0) as client:
                upstream = await client.get(f"{upstream_http}/{rest}", headers=headers)
        except httpx.HTTPError as exc:
            return Response(f"the live viewer is not reachable ({type(exc).__name__})", status_code=502, media_type="text/plain")
        passed = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
        if passed.get("content-type", "").startswith("text/html"):
            passed["content-security-policy"] = content_security_policy(upstream.content)
        passed["x-content-type-options"] = "nosniff"
        return Response(upstream.content, status_code=upstream.status_code, headers=passed)

    @app.get(path + "/k/{key}", include_in_schema=False)
    async def viewer_key_root(key: str, request: Request):
        if not re.fullmatch(VIEWER_KEY, key):
            return Response("not found", status_code=404, media_type="text/plain")
        return RedirectResponse(f"{request.scope.get('root_path', '')}{path}/k/{key}/")

    @app.get(path + "/k/{key}/{rest:path}", include_in_schema=False)
    async def viewer_key_http(key: str, rest: str):
        if not re.fullmatch(VIEWER_KEY, key):
            return Response("not found", status_code=404, media_type="text/plain")
        return await forward(rest)

    @app.get(path + "/{rest:path}", include_in_schema=False)
    async def viewer_http(rest: str):
        return await forward(rest)

    async def pump(ws: WebSocket, upstream_path: str) -> None:
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        try:
            upstream = await websockets.connect(upstream_ws + upstream_path, subprotocols=offered or None, max_size=MAX_MESSAGE,
                                                compression=None, open_timeout=10)
        except (OSError, websockets.WebSocketException, asyncio.TimeoutError):
            await ws.close(code=1011, reason="the live viewer is not reachable")
            return
        await ws.accept(subprotocol=upstream.subprotocol)

        async def browser_to_viewer():
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data = msg.get("bytes")
                await upstream.send(data if data is not None else msg.get("text", ""))

        async def viewer_to_browser():
            async for data in upstream:
                if isinstance(data, bytes):
                    await ws.send_bytes(data)
                else:
                    await ws.send_text(data)

        tasks = [asyncio.ensure_future(browser_to_viewer()), asyncio.ensure_future(viewer_to_browser())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:  # a closed peer ends its pump with an exception: nothing to report
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, websockets.ConnectionClosed, RuntimeError, OSError):
                    await t
            await upstream.close()
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                await ws.close()

    @app.websocket(path)
    async def viewer_ws(ws: WebSocket):
        await pump(ws, "/")

    @app.websocket(path + "/k/{key}")
    async def viewer_key_ws(ws: WebSocket, key: str):
        if not re.fullmatch(VIEWER_KEY, key):
            await ws.close(code=1008)
            return
        await pump(ws, f"/k/{key}")
