"""The Molecule test containers (Debian 12 and 13), reached with podman exec, no SSH needed.

    pyinfra -y inventories/molecule.py deploys/home_server.py

Molecule's converge step (molecule/default/converge.yml) runs this with
SELFHOST_MOLECULE_HOSTS set to the names of the containers it created; by hand the
defaults below match the platforms in molecule/default/molecule.yml. SELFHOST_CONFIG picks
another model (default: examples/home.yaml of this repository).
"""

import os
from pathlib import Path

_repo = Path(__file__).resolve().parent.parent
_names = os.environ.get("SELFHOST_MOLECULE_HOSTS") or "selfhost-bookworm,selfhost-trixie"
_config = os.environ.get("SELFHOST_CONFIG") or str(_repo / "examples" / "home.yaml")

hosts = [
    (f"@podman/{name.strip()}", {"selfhost_config": _config})
    for name in _names.split(",")
    if name.strip()
]
