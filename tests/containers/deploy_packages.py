"""A deploy of the packages phase alone (tests/containers): ``--data packages=a,b``.

The same state query, announcement and operation as a full deploy's packages phase, without
the rest of a model (so a test of the package manager takes seconds, not minutes)."""

from pyinfra.context import host

from selfhost.backend.pyinfra import _get_state, _log_waits, packages
from selfhost.state import Query

names = tuple(str(host.data.get("packages", "hello")).split(","))
state = _get_state(Query(packages=names, prechecks=True))
_log_waits(state)
packages(name="selfhost packages", names=names, state=state)
