"""Run the tokenizer: settings -> logging -> metrics -> vocabulary (fail fast) -> gRPC."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.common.errors import DataLoss, FailedPrecondition
from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.pb import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.server import GrpcServer, run_until_signal
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.settings import TokenizerSettings
from services.tokenizer.tokenization import Tokenizer

log = logging.getLogger(__name__)

# Exit status when the vocabulary is missing or corrupt: a configuration error, not a crash.
EXIT_NO_VOCABULARY = 2
SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name


def load_tokenizer(settings: TokenizerSettings) -> Tokenizer:
    """Raises FailedPrecondition (missing) or DataLoss (corrupt) at once; downloads only if allowed."""
    return Tokenizer.from_cache(
        settings.vocab_cache_dir,
        allow_download=settings.allow_download,
        max_input_chars=settings.max_input_chars,
        max_tokens=settings.max_tokens,
    )


async def start_tokenizer(settings: TokenizerSettings, tokenizer: Tokenizer | None = None) -> GrpcServer:
    """Start the service; returns the running server so tests can run it in-process."""
    tokenizer = tokenizer or load_tokenizer(settings)
    server = GrpcServer(
        "tokenizer", [SERVICE_NAME], host=settings.host, port=settings.port, grace_s=settings.shutdown_grace_s
    )
    servicer = TokenizerServicer(tokenizer, settings.max_batch)
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(servicer, server.server)
    await server.start()
    return server


async def serve(settings: TokenizerSettings, tokenizer: Tokenizer) -> None:
    server = await start_tokenizer(settings, tokenizer)
    await run_until_signal(server)


def main() -> int:
    settings = TokenizerSettings()
    setup_logging("tokenizer", level=settings.log_level, fmt=settings.log_format)
    start_metrics_server(settings.metrics_port)
    try:
        tokenizer = load_tokenizer(settings)
    except (FailedPrecondition, DataLoss) as error:
        log.error("vocabulary_unavailable", extra={"status": error.status, "cause": str(error)})
        print(
            f"tokenizer cannot start ({error.status}): {error} "
            "(the tokenizer reads its cache dir from SYNAPSE_TOKENIZER_VOCAB_CACHE_DIR)",
            file=sys.stderr,
        )
        return EXIT_NO_VOCABULARY
    log.info("vocabulary_loaded", extra={"cache_dir": str(settings.vocab_cache_dir), "vocab": tokenizer.vocab_size})
    asyncio.run(serve(settings, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
