"""`selfhost.compile.diff`: what would change, as one pure function of (plan step, state)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from selfhost.compile import Target, compile_server
from selfhost.compile.diff import Change, step_changes
from selfhost.compile.plan import Directory, File, Packages, Plan, Run, UnitState, User
from selfhost.config import load_server
from selfhost.state import FileState, State, UserState

ROOT = Path(__file__).resolve().parent.parent


def plan() -> Plan:
    return compile_server(load_server(ROOT / "examples" / "home.yaml"), Target())


def converged(p: Plan) -> State:
    """The state of a host where every step of ``p`` holds."""
    st = State()
    for s in p.steps:
        if isinstance(s, Packages):
            st.packages = dict.fromkeys(s.names, True)
        elif isinstance(s, File):
            f = s.file
            st.files[f.path] = FileState(hashlib.sha1(f.content.encode()).hexdigest(), f.mode,
                                         f.owner, f.group)
        elif isinstance(s, Directory):
            st.dirs[s.dir.path] = FileState("-", s.dir.mode, s.dir.owner, s.dir.group)
        elif isinstance(s, Run) and s.command.unless:
            st.guards[s.command.unless] = True
        elif isinstance(s, UnitState):
            st.units[s.name] = ("enabled", "active")
        elif isinstance(s, User):
            st.users[s.name] = UserState("/bin/bash", f"/home/{s.name}", ("sudo",), "")
    st.manifest = next(s.manifest for s in p.steps if type(s).__name__ == "Removals")
    return st


def all_changes(p: Plan, st: State) -> list[Change]:
    return [c for s in p.steps for c in step_changes(s, st)]


def test_a_converged_host_has_no_change() -> None:
    p = plan()
    assert all_changes(p, converged(p)) == []


def test_each_kind_of_drift_is_found_exactly() -> None:
    p = plan()
    st = converged(p)
    st.files["/etc/ssh/sshd_config"] = FileState("0" * 40, "0600", "root", "root")
    st.files["/etc/caddy/Caddyfile"] = FileState(
        st.files["/etc/caddy/Caddyfile"].sha1, "0666", "root", "root")  # type: ignore[union-attr]
    st.units["fail2ban.service"] = ("masked", "inactive")
    st.packages["nftables"] = False
    st.guards[next(g for g in st.guards if "zoneinfo" in g)] = False
    found = {c.describe() for c in all_changes(p, st)}
    assert found == {
        "write-file /etc/ssh/sshd_config: content differs",
        "fix-file-meta /etc/caddy/Caddyfile: root:root 0666 -> root:root 0644",
        "enable-unit fail2ban.service: masked",
        "start-unit fail2ban.service: inactive",
        "install-packages nftables",
        "run time zone Europe/Paris: its guard does not hold",
    }


def test_a_service_gone_from_the_model_is_a_change() -> None:
    p = plan()
    st = converged(p)
    st.manifest = st.manifest.replace('"services": {', '"services": {"services.radicale": '
                                      '{"units": ["radicale.service"]}, ', 1) \
        if st.manifest else None
    assert [c.describe() for c in all_changes(p, st)] == [
        "remove-services services.radicale"]
