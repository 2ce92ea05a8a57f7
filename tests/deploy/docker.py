"""The Docker engine and Compose for the deployment tests: which compose command exists, one project's lifecycle,
and what a project leaves behind (containers, networks, volumes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROJECT_LABEL = "com.docker.compose.project"


def run(
    command: Sequence[str], *, timeout_s: float = 600, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command in the repository root, output captured; a failure raises with the command's output."""
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})}, cwd=REPO
    )
    if check and result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{output}")
    return result


def engine_missing() -> str:
    """Why no Docker engine answers here ('' when one does)."""
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        return f"no Docker engine answers `docker info`: {result.stderr.strip()[:300]}"
    return ""


def compose_command() -> list[str]:
    """`docker compose` (the v2 plugin) where it exists, else Debian's `docker-compose` 1.29."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise AssertionError("neither `docker compose` nor `docker-compose` is installed: run `bash ops/setup.sh`")


@dataclass
class Compose:
    """One compose project of docker-compose.yml plus test overrides, with its variables."""

    project: str
    env: dict[str, str]
    files: list[Path] = field(default_factory=lambda: [REPO / "docker-compose.yml"])
    command: list[str] = field(default_factory=compose_command)

    def __call__(self, *args: str, timeout_s: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        files = [part for path in self.files for part in ("-f", str(path))]
        return run(
            [*self.command, "-p", self.project, *files, *args],
            timeout_s=timeout_s,
            env={**self.env, "COMPOSE_PROJECT_NAME": self.project},
            check=check,
        )

    def container_ids(self, service: str, *, all_states: bool = False) -> list[str]:
        filters = ["--filter", f"label={PROJECT_LABEL}={self.project}"]
        filters += ["--filter", f"label=com.docker.compose.service={service}"]
        result = run(["docker", "ps", "--quiet", "--no-trunc", *(["--all"] if all_states else []), *filters])
        return sorted(result.stdout.split())

    def logs(self, tail: int = 40) -> str:
        result = self("logs", "--no-color", f"--tail={tail}", check=False, timeout_s=120)
        return result.stdout[-20000:]


def left_behind(project: str) -> dict[str, list[str]]:
    """Containers (any state), networks and volumes that still carry the project's label."""
    label = f"label={PROJECT_LABEL}={project}"
    found = {
        "containers": run(["docker", "ps", "--all", "--quiet", "--filter", label]).stdout.split(),
        "networks": run(["docker", "network", "ls", "--quiet", "--filter", label]).stdout.split(),
        "volumes": run(["docker", "volume", "ls", "--quiet", "--filter", label]).stdout.split(),
    }
    return {kind: names for kind, names in found.items() if names}


def inspect(container: str) -> dict:
    return json.loads(run(["docker", "inspect", container]).stdout)[0]
