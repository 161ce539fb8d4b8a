"""The Molecule test containers (Debian 12 and 13), reached with podman exec, no SSH needed.

    pyinfra -y inventories/molecule.py deploys/home_server.py

Molecule's converge step (molecule/default/converge.yml) runs this with
SELFHOST_MOLECULE_HOSTS set to the names of the containers it created; by hand the
defaults below match the platforms in molecule/default/molecule.yml. SELFHOST_CONFIG picks
another model (default: examples/home.yaml of this repository), SELFHOST_HOST the host of a
fleet file.
"""

import os
from pathlib import Path

_repo = Path(__file__).resolve().parent.parent
_names = os.environ.get("SELFHOST_MOLECULE_HOSTS") or "selfhost-bookworm,selfhost-trixie"
_config = os.environ.get("SELFHOST_CONFIG") or str(_repo / "examples" / "home.yaml")
_data = {"selfhost_config": _config}
if os.environ.get("SELFHOST_HOST"):  # which host of a fleet file (selfhost rehearse)
    _data["selfhost_host"] = os.environ["SELFHOST_HOST"]

hosts = [
    (f"@podman/{name.strip()}", dict(_data))
    for name in _names.split(",")
    if name.strip()
]
