"""The sync scenario's four containers, each naming its part of the fleet file
(``selfhost_host``)."""

from pathlib import Path

_fleet = str(Path(__file__).resolve().parent / "fleet.yaml")

hosts = [
    (f"@podman/c12-sync-{h}", {"selfhost_config": _fleet, "selfhost_host": h})
    for h in ("a-bookworm", "b-bookworm", "a-trixie", "b-trixie")
]
