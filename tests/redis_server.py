"""A real redis-server for tests: on a free port, nothing persisted; fails loudly (Unavailable, with its log) when
it does not start. RedisProcess can be killed and started again on the same port (the fault tests restart Redis
under traffic). Both live in services/launcher.py, which the bench's stacks use too."""

from services.launcher import RedisProcess, redis_server

__all__ = ["RedisProcess", "redis_server"]
