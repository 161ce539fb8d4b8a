"""`selfhost backup-status` and `selfhost restore`: run the glue on the target, over
`podman exec` (``podman:NAME``), SSH (``ssh:[USER@]HOST[:PORT]``) or locally (``local``).

backup-status prints, per repository, the last successful snapshot and its age (read from the
repository with ``restic snapshots --latest 1``; the age uses the target's clock). It exits 1
when a repository is unreachable or older than its ``max_age_hours`` is not known here, so the
age is only reported; the target's own hourly late check raises the alert.

restore restores a service's data paths (``--service``) or given paths (``--path``) from a
snapshot (default ``latest``) into ``--to`` (default ``/var/tmp/selfhost-restore/<snapshot>``)
or, with ``--in-place``, over the live files (stop the service first).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from datetime import datetime
from typing import Any

GLUE = "/usr/local/sbin/selfhost-backup"


def remote_argv(target: str, argv: list[str]) -> list[str]:
    """Command line that runs ``argv`` on ``target``."""
    kind, _, rest = target.partition(":")
    if kind == "local":
        return argv
    if kind == "podman" and rest:
        return ["podman", "exec", rest, *argv]
    if kind == "ssh" and rest:
        host, _, port = rest.partition(":")
        return ["ssh", *(["-p", port] if port else []), host, "sudo", shlex.join(argv)]
    raise SystemExit(f"target {target!r}: use podman:NAME, ssh:[USER@]HOST[:PORT] or local")


def parse_status(output: str) -> list[dict[str, Any]]:
    """Parse ``selfhost-backup status`` lines into rows with the snapshot's age."""
    rows = []
    for line in output.splitlines():
        parts = line.split("\t", 4)
        if len(parts) != 5:
            continue
        name, now, stamp, ok, payload = parts
        row: dict[str, Any] = {"repository": name, "ok": ok == "ok", "snapshot": None,
                               "time": None, "age_hours": None, "error": None,
                               "last_success_hours": None}
        if stamp.isdigit():
            row["last_success_hours"] = round((int(now) - int(stamp)) / 3600, 1)
        if ok == "ok":
            snaps = json.loads(payload or "[]")
            if snaps:
                snap = snaps[-1]
                t = _parse_time(snap["time"])
                row.update(snapshot=snap.get("short_id") or snap["id"][:8],
                           time=t.isoformat(timespec="seconds"),
                           age_hours=round((int(now) - t.timestamp()) / 3600, 1))
        else:
            row["error"] = payload
        rows.append(row)
    return rows


def _parse_time(value: str) -> datetime:
    # restic: 2024-05-01T02:03:04.123456789+02:00 -> trim the fraction to microseconds.
    head, dot, tail = value.partition(".")
    if dot:
        n = len(tail) - len(tail.lstrip("0123456789"))
        digits, tz = tail[:n], tail[n:]
        value = f"{head}.{digits[:6]}{tz}"
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_status(rows: list[dict[str, Any]]) -> str:
    out = [f"{'REPOSITORY':<16} {'LAST SNAPSHOT':<10} {'TIME':<26} AGE"]
    for r in rows:
        if not r["ok"]:
            out.append(f"{r['repository']:<16} {'-':<10} {'-':<26} unreachable: {r['error']}")
        elif r["snapshot"] is None:
            out.append(f"{r['repository']:<16} {'-':<10} {'-':<26} no snapshot yet")
        else:
            out.append(f"{r['repository']:<16} {r['snapshot']:<10} {r['time']:<26} "
                       f"{r['age_hours']} h")
    return "\n".join(out) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    res = subprocess.run(remote_argv(args.target, [GLUE, "status"]), capture_output=True,
                         text=True, check=False)
    rows = parse_status(res.stdout)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_status(rows), end="")
    if res.returncode != 0 or not rows:
        print(res.stderr.strip() or "no repositories", flush=True)
        return 1
    return 0 if all(r["ok"] and r["snapshot"] for r in rows) else 1


def restore_argv(args: argparse.Namespace, service_paths: list[str]) -> list[str]:
    paths = list(args.path or []) + service_paths
    if not paths:
        raise SystemExit("give --service or --path (refusing to restore everything by default)")
    to = "/" if args.in_place else (args.to or f"/var/tmp/selfhost-restore/{args.snapshot}")
    return [GLUE, "restore", args.repository, args.snapshot, to, *paths]


def cmd_restore(args: argparse.Namespace) -> int:
    service_paths: list[str] = []
    if args.service:
        res = subprocess.run(remote_argv(args.target, [GLUE, "paths", args.service]),
                             capture_output=True, text=True, check=True)
        service_paths = res.stdout.split()
        if not service_paths:
            raise SystemExit(f"service {args.service!r} has no data paths in the backup")
    return subprocess.run(remote_argv(args.target, restore_argv(args, service_paths)),
                          check=False).returncode


def add_subcommands(subparsers: Any) -> None:
    """Add ``backup-status`` and ``restore`` to the ``selfhost`` command's subparsers."""
    st = subparsers.add_parser("backup-status", help="last snapshot and its age, per repository")
    st.add_argument("target", help="podman:NAME, ssh:[USER@]HOST[:PORT] or local")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    rs = subparsers.add_parser("restore", help="restore a service's data or paths from a snapshot")
    rs.add_argument("target", help="podman:NAME, ssh:[USER@]HOST[:PORT] or local")
    rs.add_argument("repository", help="repository name from the model")
    rs.add_argument("snapshot", nargs="?", default="latest", help="snapshot id (default latest)")
    rs.add_argument("--service", help="restore this service's data paths")
    rs.add_argument("--path", action="append", help="restore this path (repeatable)")
    where = rs.add_mutually_exclusive_group()
    where.add_argument("--to", help="directory to restore into (default under /var/tmp)")
    where.add_argument("--in-place", action="store_true",
                       help="restore over the live files (stop the service first)")
    rs.set_defaults(func=cmd_restore)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfhost")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
