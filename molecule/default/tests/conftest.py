"""Shared fixtures for the checks of the deployed containers (testinfra, podman backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
MODEL_FILE = REPO / "examples" / "home.yaml"


@pytest.fixture(scope="session")
def model() -> dict[str, Any]:
    """The example model the containers were converged with."""
    data: dict[str, Any] = yaml.safe_load(MODEL_FILE.read_text())
    return data


@pytest.fixture(scope="module")
def release(host: Any) -> str:
    """Debian codename of the container: bookworm or trixie."""
    codename = host.check_output(". /etc/os-release && echo $VERSION_CODENAME")
    assert codename in ("bookworm", "trixie"), codename
    return str(codename)


@pytest.fixture(scope="module")
def sshd_t(host: Any) -> dict[str, list[str]]:
    """sshd's effective configuration (`sshd -T`), keyword -> values (in order)."""
    out = host.check_output("/usr/sbin/sshd -T")
    conf: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        conf.setdefault(key.lower(), []).append(value.strip())
    return conf
