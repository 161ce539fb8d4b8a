"""The dns scenario's four containers, each naming its part of the fleet file
(``selfhost_host``). SELFHOST_DNS_FLEET: another fleet file (a test's changed model)."""

import os
from pathlib import Path

_fleet = os.environ.get("SELFHOST_DNS_FLEET") or str(Path(__file__).resolve().parent / "fleet.yaml")

hosts = [
    (f"@podman/dns-{h}", {"selfhost_config": _fleet, "selfhost_host": h})
    for h in ("ns1-bookworm", "friend-bookworm", "ns1-trixie", "friend-trixie")
]
