"""A real redis-server for tests: services.launcher's (on a free port, nothing persisted; fails loudly with its
log when it does not start)."""

from services.launcher import redis_server

__all__ = ["redis_server"]
