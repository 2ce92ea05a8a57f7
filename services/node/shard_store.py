"""Shard download for nodes: HTTP with progress, sha256 checked while streaming, a local cache keyed by sha256.

A download that breaks (the sharder restarted, the network dropped) is retried with backoff for up to
`retry_s`, resuming where it broke (`Range`, guarded by `If-Range` on the shard's ETag, its sha256). The
bytes so far live in `<file>.part`; only a whole file whose size and sha256 match the manifest is renamed
into place, so a partial download is never loaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp

from services.common.errors import DataLoss, Unavailable
from services.sharder.manifest import ShardManifest

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], Awaitable[None]]
CHUNK_BYTES = 1 << 20
PROGRESS_EVERY_BYTES = 8 << 20
RETRY_FIRST_S = 0.5  # the first wait after a broken download; doubles up to RETRY_MOST_S
RETRY_MOST_S = 8.0
T = TypeVar("T")


class ShardStore:
    def __init__(self, cache_dir: Path, ssl_context: ssl.SSLContext | None = None, retry_s: float = 60.0) -> None:
        self.cache_dir = cache_dir
        self.ssl_context = ssl_context
        self.retry_s = retry_s  # how long a failing manifest or shard fetch is retried before the load fails

    async def fetch(
        self, manifest_url: str, shard_url: str, sha256: str, progress: ProgressCallback
    ) -> tuple[ShardManifest, Path]:
        """The shard's manifest and the folder holding its verified file; downloads only what is missing."""
        folder = self.cache_dir / sha256
        folder.mkdir(parents=True, exist_ok=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            manifest_text = await self._retried(manifest_url, lambda: self._get_text(session, manifest_url))
            manifest = ShardManifest.from_json(manifest_text, source=manifest_url)
            if manifest.sha256 != sha256:
                raise DataLoss(f"manifest at {manifest_url} names sha256 {manifest.sha256}, assignment says {sha256}")
            target = folder / manifest.file
            if target.exists() and target.stat().st_size == manifest.byte_size:
                log.info("shard_cached", extra={"shard": manifest.shard_id, "path": str(target)})
                await progress(manifest.byte_size, manifest.byte_size)
            else:
                await self._retried(shard_url, lambda: self._download(session, shard_url, target, manifest, progress))
        return manifest, folder

    async def _retried(self, url: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """attempt() until it succeeds, retrying Unavailable with backoff and jitter for up to retry_s."""
        loop = asyncio.get_running_loop()
        deadline, delay, tries = loop.time() + self.retry_s, RETRY_FIRST_S, 1
        while True:
            try:
                return await attempt()
            except Unavailable as error:
                wait = delay * random.uniform(0.8, 1.2)
                if loop.time() + wait > deadline:
                    raise Unavailable(f"{error}; gave up after {tries} tries in {self.retry_s:g} s") from None
                log.warning("shard_fetch_retry", extra={"url": url, "error": str(error), "retry_s": round(wait, 2)})
            await asyncio.sleep(wait)
            delay, tries = min(delay * 2, RETRY_MOST_S), tries + 1

    async def _get_text(self, session: aiohttp.ClientSession, url: str) -> str:
        try:
            async with session.get(url, ssl=self.ssl_context) as response:
                response.raise_for_status()
                return await response.text()
        except aiohttp.ClientError as error:
            raise Unavailable(f"cannot fetch {url}: {error}") from None

    async def _download(
        self,
        session: aiohttp.ClientSession,
        url: str,
        target: Path,
        manifest: ShardManifest,
        progress: ProgressCallback,
    ) -> None:
        """One attempt: resume the .part file where it stopped (or start it); Unavailable when the transfer breaks
        (the .part kept for the next attempt), DataLoss when the whole file is not the manifest's."""
        partial = target.with_suffix(target.suffix + ".part")
        digest, done = await asyncio.to_thread(_hash_partial, partial, manifest.byte_size)
        resumed_from = reported = done
        headers = {"Range": f"bytes={done}-", "If-Range": f'"{manifest.sha256}"'} if done else {}
        try:
            async with session.get(url, ssl=self.ssl_context, headers=headers) as response:
                response.raise_for_status()
                if done and response.status != 206:  # the server sends the whole file: start again
                    digest, done, resumed_from = hashlib.sha256(), 0, 0
                with partial.open("ab" if done else "wb") as handle:
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        handle.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if done - reported >= PROGRESS_EVERY_BYTES:
                            reported = done
                            await progress(done, manifest.byte_size)
                    handle.flush()
                    os.fsync(handle.fileno())
        except aiohttp.ClientResponseError as error:
            if error.status == 416:  # the .part is longer than the file: start again
                partial.unlink(missing_ok=True)
            raise Unavailable(f"shard download from {url} failed after {done} bytes: {error}") from None
        except aiohttp.ClientError as error:
            raise Unavailable(f"shard download from {url} broke after {done} bytes: {error}") from None
        if digest.hexdigest() != manifest.sha256 or done != manifest.byte_size:
            partial.unlink(missing_ok=True)
            raise DataLoss(
                f"shard from {url}: got {done} bytes with sha256 {digest.hexdigest()}, expected "
                f"{manifest.byte_size} bytes with sha256 {manifest.sha256}"
            )
        os.replace(partial, target)
        await progress(done, manifest.byte_size)
        log.info("shard_downloaded", extra={"shard": manifest.shard_id, "bytes": done, "resumed_from": resumed_from})


def _hash_partial(partial: Path, byte_size: int) -> tuple[hashlib._Hash, int]:
    """The sha256 state and length of what an earlier attempt left; a .part too long to be a prefix is dropped."""
    digest = hashlib.sha256()
    if not partial.exists() or partial.stat().st_size >= byte_size:
        partial.unlink(missing_ok=True)
        return digest, 0
    with partial.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest, partial.stat().st_size
