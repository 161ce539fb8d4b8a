"""The verifier of a rehearsal: `selfhost check` on each container finds no drift and no
failure (warnings, such as security updates published since the image was built, are
printed, not failed)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]


def test_selfhost_check_finds_no_drift_and_no_failure(host: Any) -> None:
    model = os.environ.get("SELFHOST_CONFIG") or str(REPO / "examples" / "home.yaml")
    argv = [str(REPO / ".venv" / "bin" / "selfhost"), "check", model, "--podman",
            host.backend.name, "--json"]
    if os.environ.get("SELFHOST_HOST"):
        argv += ["--host", os.environ["SELFHOST_HOST"]]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode in (0, 1, 2), res.stderr
    found = json.loads(res.stdout)["findings"]
    for f in found:
        print(f"{f['severity']}: {f['area']}: {f['what']}")
    errors = [f["what"] for f in found if f["severity"] == "error"]
    assert errors == [], "\n".join(errors)
