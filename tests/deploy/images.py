"""The images of the compose test, built the offline way: a debootstrap base, stand-ins for the third-party images
from Debian packages, and Synapse's own two images installing from a wheelhouse made on the host.

Builds are cached by the engine (a second run takes seconds); the wheelhouse lives in ~/.cache/synapse/wheelhouse
(SYNAPSE_TEST_WHEELHOUSE overrides it) and is served to `docker build` over HTTP on the loopback (the builds use
the host's network for that and nothing else: pip runs with PIP_NO_INDEX).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.deploy.docker import run

BASE_IMAGE = "synapse-base:bookworm"
TAG = "test"
TORCH_SPEC = "torch==2.13.0"  # the pin: the only torch pip can get on these machines (CUDA build, CPU works)
STANDINS = ("redis", "prometheus", "haproxy")
BUILD_TIMEOUT_S = 1800
# The wheelhouse URL is a build argument, and build arguments are part of the layer cache key: a fixed port keeps
# a second build cached (any free port when this one is taken, at the price of a rebuild).
WHEELHOUSE_PORT = int(os.environ.get("SYNAPSE_TEST_WHEELHOUSE_PORT", "19876"))


@dataclass(frozen=True)
class Images:
    control: str
    node: str
    redis: str
    prometheus: str
    haproxy: str

    def compose_env(self) -> dict[str, str]:
        """The compose file's image variables pointing at these images."""
        return {
            "SYNAPSE_CONTROL_IMAGE": self.control,
            "SYNAPSE_NODE_IMAGE": self.node,
            "SYNAPSE_REDIS_IMAGE": self.redis,
            "SYNAPSE_PROMETHEUS_IMAGE": self.prometheus,
            "SYNAPSE_HAPROXY_IMAGE": self.haproxy,
        }


def wheelhouse_dir() -> Path:
    return Path(os.environ.get("SYNAPSE_TEST_WHEELHOUSE", Path.home() / ".cache" / "synapse" / "wheelhouse"))


def build_images(timings: dict[str, float]) -> Images:
    """Build (or find cached) every image; `timings` gets the seconds of each step."""

    def timed(what: str, step: Callable[[], object]) -> None:
        started = time.perf_counter()
        step()
        timings[what] = time.perf_counter() - started

    timed("base image (debootstrap, docker import)", lambda: run(["bash", "ops/docker/make-base-image.sh", BASE_IMAGE]))
    for name in STANDINS:
        standin = functools.partial(_build, "standins.Dockerfile", name, f"synapse-standin-{name}")
        timed(f"{name} stand-in image", standin)
    wheelhouse = wheelhouse_dir()
    make_wheelhouse = ["bash", "ops/docker/make-wheelhouse.sh", str(wheelhouse), "--node"]
    timed("wheelhouse (pip download)", lambda: run(make_wheelhouse, timeout_s=BUILD_TIMEOUT_S))
    with serve_folder(wheelhouse) as url:
        offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": url}
        timed("control image", functools.partial(_build, "Dockerfile", "control", "synapse-control", offline))
        node_args = {**offline, "TORCH_SPEC": TORCH_SPEC, "TORCH_INDEX_URL": ""}
        timed("node image", functools.partial(_build, "Dockerfile", "node", "synapse-node", node_args))
    return Images(
        control=f"synapse-control:{TAG}",
        node=f"synapse-node:{TAG}",
        **{name: f"synapse-standin-{name}:{TAG}" for name in STANDINS},
    )


def _build(dockerfile: str, target: str, name: str, args: dict[str, str] | None = None) -> None:
    build_args = {"BASE_IMAGE": BASE_IMAGE, **(args or {})}
    # --force-rm: a failed step leaves no container behind. --network host: the wheelhouse on 127.0.0.1.
    command = ["docker", "build", "--quiet", "--force-rm", "--network", "host", "-f", f"ops/docker/{dockerfile}"]
    command += ["--target", target]
    command += [part for key, value in build_args.items() for part in ("--build-arg", f"{key}={value}")]
    # The Synapse images need the repository as context; the stand-ins only their Dockerfile's folder.
    context = "." if dockerfile == "Dockerfile" else "ops/docker"
    run([*command, "-t", f"{name}:{TAG}", context], timeout_s=BUILD_TIMEOUT_S)


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """A pip find-links URL for `folder`: a directory listing over HTTP on 127.0.0.1, on a thread of this process."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="wheelhouse-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
