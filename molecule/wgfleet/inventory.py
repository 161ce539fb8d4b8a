"""The wgfleet scenario's four containers, each naming its part of the fleet file
(``selfhost_host``)."""

from pathlib import Path

_fleet = str(Path(__file__).resolve().parent / "fleet.yaml")

hosts = [
    (f"@podman/wgf-{h}", {"selfhost_config": _fleet, "selfhost_host": h})
    for h in ("home-bookworm", "friend-bookworm", "home-trixie", "friend-trixie")
]
