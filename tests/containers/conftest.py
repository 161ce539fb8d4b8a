"""Fault tests on real Debian 12/13 systemd containers (podman, local images).

They take minutes, so ``pytest tests`` skips them unless ``SELFHOST_CONTAINER_TESTS=1``
(``scripts/test faults`` sets it). Every container and network is named ``h15-*`` (or
``$SELFHOST_CONTAINER_PREFIX-*``) and removed afterwards; the containers are reached only
with ``podman exec``.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator

import pytest
from faultlib import Start, podman

PREFIX = os.environ.get("SELFHOST_CONTAINER_PREFIX", "h15")
"""Prefix of the containers' names (container names are global on a machine: two runs side
by side use two prefixes)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SELFHOST_CONTAINER_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="container test: set SELFHOST_CONTAINER_TESTS=1 "
                                   "(scripts/test faults)")
    for item in items:
        if "tests/containers/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def container() -> Iterator[Start]:
    """Start systemd containers from the local images: ``start(release, *podman_args)``."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    started: list[str] = []

    def start(release: str, *extra: str) -> str:
        image = f"localhost/selfhost-debian:{release}"
        if podman("image", "exists", image, check=False).returncode != 0:
            pytest.skip(f"{image} is not built (images/build {release})")
        name = f"{PREFIX}-{release}-{uuid.uuid4().hex[:6]}"
        podman("run", "--detach", f"--name={name}", "--hostname=nas", "--systemd=always",
               *extra, image, "/sbin/init")
        started.append(name)
        for _ in range(90):
            state = podman("exec", name, "systemctl", "is-system-running", "--wait",
                           check=False, timeout=200).stdout.strip()
            if state in ("running", "degraded"):
                return name
            time.sleep(2)
        raise AssertionError(f"{name} did not boot: {state}")

    yield start
    for name in started:
        podman("rm", "--force", "--time", "0", name, check=False)


