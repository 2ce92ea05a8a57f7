"""HTTP download of shard files and manifests for nodes: ETag = sha256, Content-Length, Range, If-Range, CORS."""

from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from services.common.errors import NotFound
from services.sharder.catalog import Catalog
from services.sharder.manifest import ShardManifest

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
PACED_CHUNK_MIN_BYTES = 16 << 10  # a capped download goes in chunks of an eighth of a second's bytes, at least this
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Range, If-Range, If-None-Match",
    "Access-Control-Expose-Headers": "ETag, Content-Length, Content-Range, Accept-Ranges",
}
PREFLIGHT_MAX_AGE_S = 86_400  # how long a browser may reuse a preflight answer


@web.middleware
async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every CORS preflight (OPTIONS) at once; browsers send one before a Range GET."""
    if request.method == "OPTIONS":
        return web.Response(status=204, headers={**CORS, "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S)})
    return await handler(request)


async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
    """CORS headers on every response, errors included, just before its headers go out.

    A middleware cannot add them after the handler: a streamed file's headers are sent by then.
    """
    response.headers.update(CORS)


def make_app(catalog: Catalog, max_bytes_per_s: int | None = None) -> web.Application:
    """The download app; max_bytes_per_s paces each shard file sent (None = as fast as it goes)."""
    app = web.Application(middlewares=[preflight])
    app.on_response_prepare.append(add_cors)

    async def shard_file(request: web.Request) -> web.StreamResponse:
        try:
            manifest = catalog.manifest(request.match_info["shard_id"])
        except NotFound as error:
            raise web.HTTPNotFound(text=str(error)) from None
        if request.match_info["ext"] == "json":
            return web.Response(text=manifest.to_json(), content_type="application/json")
        return await _send_file(request, catalog, manifest, max_bytes_per_s)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app.router.add_get(r"/shards/{shard_id:[A-Za-z0-9._-]+}.{ext:safetensors|json}", shard_file)
    app.router.add_get("/healthz", health)
    return app


async def _send_file(
    request: web.Request, catalog: Catalog, manifest: ShardManifest, max_bytes_per_s: int | None
) -> web.StreamResponse:
    size, etag = manifest.byte_size, f'"{manifest.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        # Revalidate every time: the URL names a layer range, not the bytes (re-sharding may change them); the
        # ETag (sha256) makes that a cheap 304. Browsers cache by sha256 in IndexedDB anyway.
        "Cache-Control": "no-cache",
    }
    if _matches(request.headers.get("If-None-Match"), manifest.sha256):
        return web.Response(status=304, headers=headers)
    start, end, status = 0, size - 1, 200
    # If-Range (RFC 9110 13.1.5): resume only the bytes named; another ETag gets the whole file again.
    if_range = request.headers.get("If-Range")
    byte_range = (
        None if if_range is not None and if_range.strip() != etag else _parse_range(request.headers.get("Range"), size)
    )
    if byte_range is not None:
        start, end = byte_range
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    try:
        handle = catalog.shard_path(manifest).open("rb")
    except FileNotFoundError:
        log.error("shard_file_missing", extra={"shard_id": manifest.shard_id})
        raise web.HTTPNotFound(
            text=f"shard file of {manifest.shard_id} is missing on the sharder; ask Plan again to rewrite it"
        ) from None
    with handle:
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        handle.seek(start)
        remaining = end - start + 1
        chunk_bytes = min(CHUNK_BYTES, max(PACED_CHUNK_MIN_BYTES, (max_bytes_per_s or CHUNK_BYTES) // 8))
        loop = asyncio.get_running_loop()
        started, sent = loop.time(), 0
        while remaining > 0:
            chunk = await asyncio.to_thread(handle.read, min(chunk_bytes, remaining))
            if not chunk:
                break
            await response.write(chunk)
            remaining -= len(chunk)
            sent += len(chunk)
            if max_bytes_per_s:  # ahead of the cap: wait until the bytes sent are due
                await asyncio.sleep(max(0.0, started + sent / max_bytes_per_s - loop.time()))
    await response.write_eof()
    return response


def _matches(if_none_match: str | None, sha256: str) -> bool:
    """If-None-Match (RFC 9110 13.1.2): "*" or a list of entity tags, compared weakly."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or f'"{sha256}"' in tags


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """One byte range (RFC 9110 14) -> inclusive (start, end); None = send the whole file.

    A missing, malformed or multi-range header is ignored (the whole file, 200), as RFC 9110
    allows; a well-formed range that misses the file is 416 with `Content-Range: bytes */size`.
    """
    match = RANGE.match(value.strip()) if value else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes; the last 0 bytes are unsatisfiable
        start, end = (size - min(int(last), size) if int(last) else size), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None  # last < first: an invalid range, ignored
    if start >= size:
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
