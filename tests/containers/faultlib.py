"""Helpers of the container fault tests (see conftest.py).

They take minutes, so ``pytest tests`` skips them unless ``SELFHOST_CONTAINER_TESTS=1``
(``scripts/test faults`` sets it). Every container and network is named ``h15-*`` and removed
afterwards; the containers are reached only with ``podman exec``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "images" / "containers.conf"
PYINFRA = REPO / ".venv" / "bin" / "pyinfra"


def podman(*args: str, check: bool = True, timeout: float = 300,
           **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {res.stderr}")
    return res


def sh(name: str, script: str, check: bool = True,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return podman("exec", name, "sh", "-c", script, check=check, timeout=timeout)


def deploy(name: str, *args: str, deploy_file: str = "deploys/home_server.py",
           timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run pyinfra (this repository's venv) against the container, through podman exec."""
    return subprocess.run([str(PYINFRA), "-y", f"@podman/{name}", deploy_file, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


Start = Callable[..., str]
