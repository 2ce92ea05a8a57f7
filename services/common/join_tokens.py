"""Join tokens: HMAC-signed `<scope>.<expiry>.<signature>` strings a node shows at hello, issued and checked here.

A token names who may join (`*`, any node, or one node id), until when (unix seconds), and carries an
HMAC-SHA256 over both made with one of the gateways' join secrets. Gateways accept a token signed with
any secret they hold, so secrets rotate without stopping every node at once: add the new secret (first),
reissue tokens as nodes restart, drop the old secret (docs/gateway.md, "Join tokens").
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import logging
import re
import secrets
import time
from pathlib import Path

from services.common.errors import FailedPrecondition, SynapseError

log = logging.getLogger(__name__)

ANY_NODE = "*"
MIN_SECRET_CHARS = 16  # `new_secret()` makes 43 (256 random bits)
_DOMAIN = b"synapse-join-token-v1"  # what the HMAC signs is this, the scope and the expiry: never anything else
_SCOPE = re.compile(r"\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # "*" or a node id (services/wire/control.py)
_EXPIRY = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, base64url without padding


class JoinTokenRefused(SynapseError):
    """A node's join token does not admit it; the message says why and what to do."""

    status = "UNAUTHENTICATED"


def new_secret() -> str:
    """A fresh join secret: 32 random bytes, base64url."""
    return secrets.token_urlsafe(32)


def issue(secret: str, *, expires_at: int, scope: str = ANY_NODE) -> str:
    """A token for `scope` (a node id, or `*` for any node) valid until `expires_at` (unix seconds)."""
    if not _SCOPE.fullmatch(scope):
        raise ValueError(f"scope {scope!r} is neither '*' nor a node id (letters, digits, '.', '_', '-')")
    expiry = str(int(expires_at))
    if not _EXPIRY.fullmatch(expiry):
        raise ValueError(f"expiry {expires_at} is not a unix time in seconds")
    return f"{scope}.{expiry}.{_signature(secret, scope, expiry)}"


def _signature(secret: str, scope: str, expiry: str) -> str:
    message = b"\n".join([_DOMAIN, scope.encode(), expiry.encode()])
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def read_secrets_file(path: Path) -> list[str]:
    """One secret per line; blank lines and lines starting with # are skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class JoinTokens:
    """The check a gateway runs at every hello: against `secrets`, plus those of a file re-read when it changes."""

    def __init__(self, secrets_given: list[str], secrets_file: Path | None = None) -> None:
        self.given = list(secrets_given)
        self.file = secrets_file
        self._file_secrets: list[str] = []
        self._file_stamp: tuple[int, int] | None = None
        if secrets_file is not None:
            try:
                self._reload(strict=True)  # unreadable at start-up: refuse to start rather than run open
            except (OSError, ValueError) as error:
                raise FailedPrecondition(f"cannot read join secrets from {secrets_file}: {error}") from None

    @property
    def secrets(self) -> list[str]:
        if self.file is not None:
            self._reload(strict=False)
        return [*self.given, *self._file_secrets]

    @property
    def enabled(self) -> bool:
        """Tokens are required: secrets are given, or a file is named (even empty: then nobody joins)."""
        return bool(self.given) or self.file is not None

    def _reload(self, *, strict: bool) -> None:
        assert self.file is not None
        try:
            stat = self.file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._file_stamp:
                self._file_secrets, self._file_stamp = _checked(read_secrets_file(self.file), str(self.file)), stamp
                log.info("join_secrets_loaded", extra={"file": str(self.file), "secrets": len(self._file_secrets)})
        except (OSError, ValueError) as error:
            if strict:
                raise
            log.warning("join_secrets_unreadable", extra={"file": str(self.file), "error": str(error)})

    def verify(self, token: str, node_id: str, now: float | None = None) -> str:
        """The token's scope when it admits `node_id` now; else JoinTokenRefused saying why."""
        if not token:
            raise JoinTokenRefused(
                "no join token: this gateway admits only nodes that show one (SYNAPSE_NODE_JOIN_TOKEN on a native "
                "node, ?join_token= on the web node page; `synapse token` issues one)"
            )
        parts = token.rsplit(".", 2)
        if len(parts) != 3 or not (
            _SCOPE.fullmatch(parts[0]) and _EXPIRY.fullmatch(parts[1]) and _SIGNATURE.fullmatch(parts[2])
        ):
            raise JoinTokenRefused("malformed join token: expected <scope>.<expiry>.<signature> from `synapse token`")
        scope, expiry, signature = parts
        # Every secret is compared, each in constant time: the answer's timing says nothing of which matched.
        matches = [hmac.compare_digest(_signature(secret, scope, expiry), signature) for secret in self.secrets]
        if not any(matches):
            raise JoinTokenRefused(
                "join token signature matches none of this gateway's secrets (forged, or signed with a retired "
                "secret): ask for a new token"
            )
        if int(expiry) <= (time.time() if now is None else now):
            when = datetime.datetime.fromtimestamp(int(expiry), datetime.UTC).isoformat(timespec="seconds")
            raise JoinTokenRefused(f"join token expired at {when}: ask for a new token")
        if scope not in (ANY_NODE, node_id):
            raise JoinTokenRefused(f"join token is for node {scope!r}, not {node_id!r}")
        return scope


def check_secrets(values: list[str]) -> list[str]:
    """Settings validation: each secret long enough and without separators."""
    return _checked(values, "SYNAPSE_GATEWAY_JOIN_SECRETS")


def _checked(values: list[str], where: str) -> list[str]:
    for value in values:
        if len(value) < MIN_SECRET_CHARS or any(char.isspace() or char == "," for char in value):
            raise ValueError(
                f"a join secret in {where} is shorter than {MIN_SECRET_CHARS} characters or holds a space or "
                "comma: make one with `synapse token --new-secret`"
            )
    return values
