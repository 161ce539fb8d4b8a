"""The mail limits' alert script (selfhost/services/mail-limits.sh) made runnable in a test:
its mail goes to TMP/mail, its state to TMP/state/, `logger` to TMP/logger, with the test's
stand-in commands first on PATH."""

from __future__ import annotations

from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "selfhost" / "services" / "mail-limits.sh"


def limits_script(tmp_path: Path, bin_: Path, hostname: str) -> Path:
    """Add the `logger` and `hostname` stand-ins to ``bin_``, make every stand-in executable,
    and write the script that sends into files under ``tmp_path``; return its path."""
    (bin_ / "logger").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/logger\n")
    (bin_ / "hostname").write_text(f"#!/bin/sh\necho {hostname}\n")
    for p in bin_.iterdir():
        p.chmod(0o755)
    script = SCRIPT.read_text()
    script = script.replace("/usr/sbin/sendmail", f"tee {tmp_path}/mail >/dev/null; true")
    script = script.replace("/var/lib/selfhost/", f"{tmp_path}/state/")
    out = tmp_path / "run.sh"
    out.write_text(script)
    return out
