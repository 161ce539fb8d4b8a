"""Compare what really listens on a target with what the model accounts for.

``selfhost listening FILE --podman NAME`` (or ``--ssh USER@HOST``) runs ``ss`` on the target
and lists the sockets reachable from outside that no port of the model explains: a service
that should not be there, or one the model forgot. Loopback-only sockets are internal and
never reported.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from selfhost.compile.plan import Plan

SS_COMMAND = "ss -H -tulpn"


@dataclass(frozen=True)
class Socket:
    proto: str
    address: str
    port: int
    process: str

    def describe(self) -> str:
        return f"{self.port}/{self.proto} on {self.address} ({self.process or 'unknown process'})"


_PROC_RE = re.compile(r'\(\("([^"]+)"')


def parse_ss(output: str) -> list[Socket]:
    """Parse ``ss -H -tulpn`` output."""
    out = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] not in ("tcp", "udp"):
            continue
        local = fields[4]
        addr, _, port = local.rpartition(":")
        if not port.isdigit():
            continue
        m = _PROC_RE.search(line)
        out.append(Socket(fields[0], addr.strip("[]"), int(port), m.group(1) if m else ""))
    return out


def is_loopback(address: str) -> bool:
    address = address.split("%", 1)[0]
    if address in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def unaccounted(plan: Plan, sockets: Sequence[Socket]) -> list[Socket]:
    """Sockets reachable from the network that no port of the plan explains."""
    allowed = {(p.port, p.proto) for p in plan.ports}
    return sorted(
        {s for s in sockets if not is_loopback(s.address) and (s.port, s.proto) not in allowed},
        key=lambda s: (s.port, s.proto, s.address),
    )


def runner(podman: str | None = None, ssh: str | None = None,
           ssh_port: int | None = None) -> Callable[[str], list[str]]:
    """A function sending a shell script on standard input to the target's shell (as root,
    with sudo over SSH) and returning its output lines: one round trip per call, and no
    length limit of a command line."""
    if podman:
        argv = ["podman", "exec", "-i", podman, "sh", "-s"]
    elif ssh:
        argv = ["ssh", *(["-p", str(ssh_port)] if ssh_port else []), ssh, "sudo", "sh", "-s"]
    else:
        raise ValueError("give a podman container name or an SSH destination")

    def run(text: str) -> list[str]:
        done = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=180,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the script failed on the target: {done.stderr.strip()}")
        return done.stdout.splitlines()

    return run
