"""One port for everything: the viser viewer reached through the page's own server.

A Hugging Face Space exposes a single port, so the page's server also forwards ``/viewer/``
(viser's client, HTTP) and ``/viewer`` (its websocket, where viser's client connects: the page's
URL with ``ws://`` and no trailing slash) to the viser server on its local port. Locally the
viewer stays reachable on its own port too.
"""

from __future__ import annotations

import asyncio
import contextlib

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


def add_viewer_proxy(app: fastapi.FastAPI, viewer_port: int, path: str = VIEWER_PATH) -> None:
    """Forward ``path`` + ``/...`` (HTTP) and the websocket at ``path`` to viser on
    127.0.0.1:``viewer_port``. Call before the app serves its first request."""
    upstream_http = f"http://127.0.0.1:{viewer_port}"
    upstream_ws = f"ws://127.0.0.1:{viewer_port}"

    @app.get(path, include_in_schema=False)
    async def viewer_root(request: Request):
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{request.scope.get('root_path', '')}{path}/{query}")

    @app.get(path + "/{rest:path}", include_in_schema=False)
    async def viewer_http(rest: str, request: Request):
        headers = {"accept-encoding": "identity"}
        try:
            async with httpx.AsyncClient(timeout=30.0) as client:
                upstream = await client.get(f"{upstream_http}/{rest}", headers=headers)
        except httpx.HTTPError as exc:
            return Response(f"the live viewer is not reachable ({type(exc).__name__})", status_code=502, media_type="text/plain")
        passed = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
        return Response(upstream.content, status_code=upstream.status_code, headers=passed)

    @app.websocket(path)
    async def viewer_ws(ws: WebSocket):
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        try:
            upstream = await websockets.connect(upstream_ws, subprotocols=offered or None, max_size=MAX_MESSAGE,
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
