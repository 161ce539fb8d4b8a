"""The resolver scenario's containers, reached with podman exec: each is one host of the
scenario's fleet (model.yaml), named in molecule.yml (`host`)."""

from pathlib import Path

import yaml

_here = Path(__file__).resolve().parent
_platforms = yaml.safe_load((_here / "molecule.yml").read_text())["platforms"]

hosts = [
    (f"@podman/{p['name']}", {"selfhost_config": str(_here / "model.yaml"),
                              "selfhost_host": p["host"]})
    for p in _platforms
]
