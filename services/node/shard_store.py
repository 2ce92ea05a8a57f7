"""Shard download for nodes: HTTP with progress, sha256 checked while streaming, a local cache keyed by sha256."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from services.common.errors import DataLoss, Unavailable
from services.sharder.manifest import ShardManifest

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], Awaitable[None]]
CHUNK_BYTES = 1 << 20
PROGRESS_EVERY_BYTES = 8 << 20


class ShardStore:
    def __init__(self, cache_dir: Path, ssl_context: ssl.SSLContext | None = None) -> None:
        self.cache_dir = cache_dir
        self.ssl_context = ssl_context

    async def fetch(
        self, manifest_url: str, shard_url: str, sha256: str, progress: ProgressCallback
    ) -> tuple[ShardManifest, Path]:
        """The shard's manifest and the folder holding its verified file; downloads only what is missing."""
        folder = self.cache_dir / sha256
        folder.mkdir(parents=True, exist_ok=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            manifest_text = await self._get_text(session, manifest_url)
            manifest = ShardManifest.from_json(manifest_text, source=manifest_url)
            if manifest.sha256 != sha256:
                raise DataLoss(f"manifest at {manifest_url} names sha256 {manifest.sha256}, assignment says {sha256}")
            target = folder / manifest.file
            if target.exists() and target.stat().st_size == manifest.byte_size:
                log.info("shard_cached", extra={"shard": manifest.shard_id, "path": str(target)})
                await progress(manifest.byte_size, manifest.byte_size)
            else:
                await self._download(session, shard_url, target, manifest, progress)
        return manifest, folder

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
        partial = target.with_suffix(target.suffix + ".part")
        digest = hashlib.sha256()
        done = reported = 0
        try:
            async with session.get(url, ssl=self.ssl_context) as response:
                response.raise_for_status()
                with partial.open("wb") as handle:
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        handle.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if done - reported >= PROGRESS_EVERY_BYTES:
                            reported = done
                            await progress(done, manifest.byte_size)
                    handle.flush()
                    os.fsync(handle.fileno())
        except aiohttp.ClientError as error:
            partial.unlink(missing_ok=True)
            raise Unavailable(f"shard download from {url} failed after {done} bytes: {error}") from None
        if digest.hexdigest() != manifest.sha256 or done != manifest.byte_size:
            partial.unlink(missing_ok=True)
            raise DataLoss(
                f"shard from {url}: got {done} bytes with sha256 {digest.hexdigest()}, expected "
                f"{manifest.byte_size} bytes with sha256 {manifest.sha256}"
            )
        os.replace(partial, target)
        await progress(done, manifest.byte_size)
        log.info("shard_downloaded", extra={"shard": manifest.shard_id, "bytes": done})
