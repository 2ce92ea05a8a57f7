"""`synapse token`: issue a join token signed with the gateways' newest join secret, or make a new secret."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from services.common.errors import FailedPrecondition

HELP = "Issue a join token for nodes (signed with the first join secret), or print a new join secret."
MAX_DAYS = 3650


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", default="*", metavar="NODE_ID", help="the one node id it admits (default: any)")
    parser.add_argument("--days", type=_days, default=30.0, help=f"validity in days, up to {MAX_DAYS} (default 30)")
    parser.add_argument(
        "--secrets-file",
        type=Path,
        help="sign with this file's first secret (default: SYNAPSE_GATEWAY_JOIN_SECRETS, then ..._FILE)",
    )
    parser.add_argument("--new-secret", action="store_true", help="print a fresh random join secret and exit")


def _days(text: str) -> float:
    days = float(text)
    if not 0 < days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, {MAX_DAYS}] days")
    return days


def signing_secret(secrets_file: Path | None) -> str:
    """The secret new tokens are signed with: the first one the gateways would hold."""
    from services.common.join_tokens import read_secrets_file
    from services.gateway.settings import GatewaySettings

    if secrets_file is None:
        settings = GatewaySettings()
        secrets, secrets_file = settings.join_secrets, settings.join_secrets_file
    else:
        secrets = []
    if not secrets and secrets_file is not None:
        secrets = read_secrets_file(secrets_file)
    if not secrets:
        raise FailedPrecondition(
            "no join secret to sign with: set SYNAPSE_GATEWAY_JOIN_SECRETS (as the gateways have it) or pass "
            "--secrets-file; `synapse token --new-secret` makes a secret"
        )
    return secrets[0]


def run(args: argparse.Namespace) -> int:
    from services.common.join_tokens import issue, new_secret

    if args.new_secret:
        print(new_secret())
        return 0
    expires_at = int(time.time() + args.days * 86400)
    try:
        token = issue(signing_secret(args.secrets_file), expires_at=expires_at, scope=args.node)
    except ValueError as error:
        raise FailedPrecondition(str(error)) from None
    until = datetime.datetime.fromtimestamp(expires_at, datetime.UTC).isoformat(timespec="seconds")
    who = "any node" if args.node == "*" else f"node {args.node}"
    print(token)
    print(f"join token for {who}, valid until {until}", file=sys.stderr)
    print(f"  native node: SYNAPSE_NODE_JOIN_TOKEN={token}", file=sys.stderr)
    print(f"  web node:    https://<gateway>:8765/?join_token={token}", file=sys.stderr)
    return 0
