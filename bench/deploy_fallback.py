"""Fallback deploy used by bench/ while selfhost/config.py does not exist yet.

Equivalent to deploys/home_server.py: load the YAML model named by host data
``selfhost_config``, compile it for the detected target and apply the plan.
"""

from pathlib import Path

from pyinfra import host
from ruamel.yaml import YAML

from selfhost.backend.pyinfra import apply_plan, target_for_host
from selfhost.compile import compile_server
from selfhost.models import Server

p = Path(host.data.get("selfhost_config"))
s = Server.model_validate(YAML(typ="safe").load(p.read_text())).with_base_dir(p.parent.resolve())
apply_plan(compile_server(s, target_for_host()), s)
