"""The deploy of ``selfhost_config`` (like deploys/home_server.py), whose Caddyfile gets one
more site block that listens on ``--data caddy_extra_port=PORT`` (tests/containers).

The model has no knob for a web port, so this is how a Caddyfile that passes
``caddy validate`` but cannot be loaded (its port is already taken on the target) reaches a
real deploy: the plan is the compiler's, only that file's content gains the block; every
command sent is the backend's own (stage, validate, keep the previous version, reload, roll
back)."""

import dataclasses

from pyinfra.context import host

from selfhost.backend.pyinfra import _load_prepared, apply_plan, fleet_host, target_for_host
from selfhost.compile import compile_fleet
from selfhost.compile.plan import File
from selfhost.compose.keys import DirKeyStore

fleet, prepared = _load_prepared(str(host.data.get("selfhost_config")))
me = fleet_host(fleet)
keys = DirKeyStore()
plan = compile_fleet(fleet, {me: target_for_host()}, keys, hosts=[me], prepared=prepared)[me]
port = int(host.data.get("caddy_extra_port", 8081))
extra = f'\n:{port} {{\n\trespond "extra site on {port}"\n}}\n'
plan.steps = [
    dataclasses.replace(s, file=dataclasses.replace(s.file, content=s.file.content + extra))
    if isinstance(s, File) and s.file.path == "/etc/caddy/Caddyfile" else s
    for s in plan.steps]
apply_plan(plan, fleet.hosts[me], keys)
