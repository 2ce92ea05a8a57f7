"""HTTP download of shard files and manifests for nodes: ETag = sha256, Content-Length, Range, CORS."""

from __future__ import annotations

import logging
import re

from aiohttp import web

from services.common.errors import NotFound
from services.sharder.catalog import Catalog

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Range, If-None-Match",
    "Access-Control-Expose-Headers": "ETag, Content-Length, Content-Range, Accept-Ranges",
}


@web.middleware
async def cors(request: web.Request, handler) -> web.StreamResponse:
    if request.method == "OPTIONS":
        return web.Response(status=204, headers=CORS)
    try:
        response = await handler(request)
    except web.HTTPException as error:
        error.headers.update(CORS)
        raise
    response.headers.update(CORS)
    return response


def make_app(catalog: Catalog) -> web.Application:
    app = web.Application(middlewares=[cors])

    async def shard_file(request: web.Request) -> web.StreamResponse:
        try:
            manifest = catalog.manifest(request.match_info["shard_id"])
        except NotFound as error:
            raise web.HTTPNotFound(text=str(error)) from None
        if request.match_info["ext"] == "json":
            return web.Response(
                body=catalog.manifest_path(manifest).read_bytes(), content_type="application/json"
            )
        return await _send_file(request, catalog, manifest)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app.router.add_get(r"/shards/{shard_id:[A-Za-z0-9._-]+}.{ext:safetensors|json}", shard_file)
    app.router.add_get("/healthz", health)
    return app


async def _send_file(request: web.Request, catalog: Catalog, manifest) -> web.StreamResponse:
    path, size, etag = catalog.shard_path(manifest), manifest.byte_size, f'"{manifest.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Cache-Control": "public, max-age=31536000, immutable",
    }  # content-addressed: never changes
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    start, end, status = 0, size - 1, 200
    if "Range" in request.headers:
        start, end = _parse_range(request.headers["Range"], size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            await response.write(chunk)
            remaining -= len(chunk)
    await response.write_eof()
    return response


def _parse_range(value: str, size: int) -> tuple[int, int]:
    """One byte range (RFC 9110) -> inclusive (start, end); unsatisfiable -> 416."""
    match = RANGE.match(value.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # the real port when port is 0
    log.info("http_serving", extra={"url": f"http://{host}:{bound}/shards/"})
    return runner, bound
