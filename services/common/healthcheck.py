"""`python -m services.common.healthcheck ADDRESS`: exit 0 when a gRPC server reports SERVING, else 1.

The container health check of every Synapse image (docker-compose.yml). `--http URL` checks an HTTP endpoint
instead (the native node has no gRPC server: its /metrics answers while it runs).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence


def grpc_serving(address: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """(serving, what was seen) from the standard grpc.health.v1 Check of `service` ("" = the whole server)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def http_ok(url: str, timeout_s: float) -> tuple[bool, str]:
    """(2xx, what was seen) of a GET of `url`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300, f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        return False, str(error)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck", description=__doc__)
    parser.add_argument("address", nargs="?", help="host:port of a gRPC server with the standard health service")
    parser.add_argument("--service", default="", help="Service name to check (default: the whole server).")
    parser.add_argument("--http", metavar="URL", help="Check this HTTP URL instead of gRPC health.")
    parser.add_argument("--timeout", type=float, default=3.0, help="Seconds to wait for the answer (default 3).")
    args = parser.parse_args(argv)
    if bool(args.address) == bool(args.http):
        parser.error("give either a gRPC ADDRESS or --http URL")
    if args.http:
        healthy, seen = http_ok(args.http, args.timeout)
    else:
        healthy, seen = grpc_serving(args.address, args.service, args.timeout)
    print(f"{'healthy' if healthy else 'unhealthy'}: {args.http or args.address} {seen}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
