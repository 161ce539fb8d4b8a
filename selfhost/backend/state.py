"""One shell script that reads everything the plan depends on in a single round trip.

A no-op re-deploy must be nearly free: instead of one fact per file, unit, package and user,
the backend asks for all of them at once and compares locally.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Query:
    files: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    guards: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    users: tuple[str, ...] = ()


@dataclass
class FileState:
    sha1: str
    mode: str
    owner: str
    group: str


@dataclass
class UserState:
    shell: str
    home: str
    groups: tuple[str, ...]
    shadow_sha1: str


@dataclass
class State:
    files: dict[str, FileState | None] = field(default_factory=dict)
    dirs: dict[str, FileState | None] = field(default_factory=dict)
    guards: dict[str, bool] = field(default_factory=dict)
    units: dict[str, tuple[str, str]] = field(default_factory=dict)  # (enabled, active)
    packages: dict[str, bool] = field(default_factory=dict)
    users: dict[str, UserState | None] = field(default_factory=dict)


def script(q: Query) -> str:
    """The shell script. Every output line is ``KIND<TAB>INDEX<TAB>values...``."""
    q_ = shlex.quote
    parts = ["export LC_ALL=C"]
    for i, path in enumerate(q.files):
        parts.append(
            f"if [ -f {q_(path)} ]; then printf 'F\\t{i}\\t%s\\t%s\\n' "
            f"\"$(sha1sum < {q_(path)} | cut -c1-40)\" \"$(stat -L -c '%a %U %G' {q_(path)})\"; "
            f"else printf 'F\\t{i}\\t-\\n'; fi"
        )
    for i, path in enumerate(q.dirs):
        parts.append(
            f"if [ -d {q_(path)} ]; then printf 'D\\t{i}\\t-\\t%s\\n' "
            f"\"$(stat -L -c '%a %U %G' {q_(path)})\"; else printf 'D\\t{i}\\t-\\n'; fi"
        )
    for i, guard in enumerate(q.guards):
        parts.append(
            f"if ( {guard} ) >/dev/null 2>&1; then printf 'G\\t{i}\\t1\\n'; "
            f"else printf 'G\\t{i}\\t0\\n'; fi"
        )
    for i, unit in enumerate(q.units):
        parts.append(
            f"printf 'U\\t{i}\\t%s\\t%s\\n' \"$(systemctl is-enabled {q_(unit)} 2>/dev/null)\" "
            f"\"$(systemctl is-active {q_(unit)} 2>/dev/null)\""
        )
    if q.packages:
        names = " ".join(q_(p) for p in q.packages)
        parts.append(
            f"dpkg-query -W -f='P\\t${{Package}}\\t${{db:Status-Abbrev}}\\n' {names} 2>/dev/null"
        )
    for i, user in enumerate(q.users):
        parts.append(
            f"if e=$(getent passwd {q_(user)}); then printf 'W\\t{i}\\t%s\\t%s\\t%s\\t%s\\n' "
            f"\"$(echo \"$e\" | cut -d: -f7)\" \"$(echo \"$e\" | cut -d: -f6)\" "
            f"\"$(id -nG {q_(user)} | tr ' ' ,)\" "
            f"\"$(getent shadow {q_(user)} | cut -d: -f2 | sha1sum | cut -c1-40)\"; "
            f"else printf 'W\\t{i}\\t-\\n'; fi"
        )
    parts.append("true")
    return "\n".join(parts)


def parse(q: Query, lines: list[str]) -> State:
    st = State(
        files=dict.fromkeys(q.files),
        dirs=dict.fromkeys(q.dirs),
        guards=dict.fromkeys(q.guards, False),
        units={u: ("", "") for u in q.units},
        packages=dict.fromkeys(q.packages, False),
        users=dict.fromkeys(q.users),
    )
    for line in lines:
        f = line.split("\t")
        kind = f[0]
        if kind == "P" and len(f) >= 3:
            st.packages[f[1]] = f[2][:2] in ("ii", "hi")
            continue
        if len(f) < 3 or not f[1].isdigit():
            continue
        i = int(f[1])
        if (kind in "FD" and f[2] != "-") or (kind == "D" and len(f) == 4):
            meta = f[3].split() if len(f) == 4 else []
            if len(meta) == 3:
                fs = FileState(f[2], meta[0].zfill(4), meta[1], meta[2])
                if kind == "F":
                    st.files[q.files[i]] = fs
                else:
                    st.dirs[q.dirs[i]] = fs
        elif kind == "G":
            st.guards[q.guards[i]] = f[2] == "1"
        elif kind == "U":
            st.units[q.units[i]] = (f[2], f[3] if len(f) > 3 else "")
        elif kind == "W" and f[2] != "-" and len(f) >= 6:
            st.users[q.users[i]] = UserState(f[2], f[3], tuple(f[4].split(",")), f[5])
    return st
