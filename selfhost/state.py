"""The target's state: one shell script that reads everything a plan depends on in a single
round trip, and its parser. Pure (no connection): the pyinfra backend runs the script, and the
same state feeds :mod:`selfhost.compile.diff`.

A no-op re-deploy must be nearly free: instead of one fact per file, unit, package and user,
the backend asks for all of them at once and compares locally.
"""

from __future__ import annotations

import base64
import re
import shlex
from dataclasses import dataclass, field

PENDING_DIR = "/var/lib/selfhost/pending"
"""One empty file per reload or on-change command that a deploy owes the target: made before
the file that calls for it is replaced, removed once it has run. A deploy killed in between
leaves it, and the next deploy runs what it names even though its files no longer change."""
PREV_DIR = "/var/lib/selfhost/prev"
"""Root-only directory (0700) holding, under their own path, the previous versions of the
managed files a deploy replaced and whose unit it has not yet reloaded with the new ones:
put back when that reload fails (see ``selfhost.backend.pyinfra.reload_with_rollback``)."""
UPLOAD_DIR = ".cache/selfhost-upload"
"""Where, in the home of the user pyinfra logs in as, secrets are uploaded before sudo copies
them into place: a directory only that user can enter (mode 0700)."""

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._@+/-]+$")  # pyinfra puts it unquoted in `cp TEMP DEST`
_YESCRYPT_SETTING = re.compile(r"^\$y\$[./0-9A-Za-z]+\$[./0-9A-Za-z]+$")


@dataclass(frozen=True)
class Query:
    files: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    guards: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    upload_dir: bool = False
    """Also prepare the private upload directory of the login user (see :data:`UPLOAD_DIR`)."""
    manifest: str | None = None
    """Also read this file (selfhost's manifest of the previous deploy), base64-encoded."""
    pending: bool = False
    """Also list the reloads and on-change commands that an interrupted deploy left to do
    (markers in :data:`PENDING_DIR`)."""
    prechecks: bool = False
    """Also read what the target can do: an interrupted or busy dpkg, CAP_NET_ADMIN and a
    working ``nft`` (see :class:`Prechecks`)."""
    space: tuple[str, ...] = ()
    """Paths whose file system's free space (KiB) and free inodes to read (see
    :class:`Space`); a path that does not exist yet is measured at its nearest existing
    parent."""


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
class Prechecks:
    """What the target can do, read before anything is changed."""

    dpkg_interrupted: bool = False
    """/var/lib/dpkg/updates is not empty: a dpkg run was interrupted (or is running)."""
    apt_busy: str = ""
    """The process holding a lock of apt or dpkg ("unattended-upgr (pid 123)"), if any."""
    net_admin: bool | None = None
    """Whether the deploy runs with CAP_NET_ADMIN (None: unknown)."""
    nft_works: bool | None = None
    """Whether ``nft list tables`` works (None: nft is not installed)."""


@dataclass(frozen=True)
class Space:
    """Free space on the file system that holds a path."""

    avail_kib: int
    free_inodes: int | None
    """None when the file system does not count inodes (btrfs, some tmpfs)."""
    mount: str


@dataclass
class State:
    files: dict[str, FileState | None] = field(default_factory=dict)
    dirs: dict[str, FileState | None] = field(default_factory=dict)
    guards: dict[str, bool] = field(default_factory=dict)
    units: dict[str, tuple[str, str]] = field(default_factory=dict)  # (enabled, active)
    packages: dict[str, bool] = field(default_factory=dict)
    users: dict[str, UserState | None] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    """Per user with a yescrypt password hash, its setting ``$y$PARAMS$SALT`` (never the hash
    value itself): enough to tell whether a password is unchanged by hashing it again."""
    manifest: str | None = None
    """The previous deploy's manifest (None: there is none)."""
    prechecks: Prechecks = field(default_factory=Prechecks)
    pending: set[str] = field(default_factory=set)
    """Markers left in :data:`PENDING_DIR` by an interrupted deploy."""
    space: dict[str, Space | None] = field(default_factory=dict)
    staged: set[str] = field(default_factory=set)
    """Managed files whose staged copy (``PATH.selfhost-new``) an interrupted deploy left."""
    upload_dir: str | None = None
    """The private upload directory of the login user (absolute path); ``""`` when no sudo is
    involved, so uploads go straight to their destination; ``None`` when not asked for or
    it could not be prepared safely."""


_UPLOAD_DIR_SCRIPT = (
    # Under sudo (or doas) this script runs as root, but pyinfra uploads with sftp as the
    # login user, into a temporary file that sudo then copies into place: give that user a
    # directory only they can enter (made as that user), and report it with its mode and
    # owner. Without sudo, uploads go straight to their destination: nothing to prepare.
    r"""u=${SUDO_USER:-${DOAS_USER:-}}
if [ -z "$u" ]; then printf 'X\t0\t-\n'; else
d="$(getent passwd "$u" | cut -d: -f6)/""" + UPLOAD_DIR + r""""
mk='umask 077; mkdir -p "$1" && chmod 700 "$1" && find "$1" -type f -mmin +60 -delete'
if [ "$(id -un)" = "$u" ]; then sh -c "$mk" sh "$d"
else runuser -u "$u" -- sh -c "$mk" sh "$d"; fi >/dev/null 2>&1
printf 'X\t0\t%s\t%s\t%s\n' "$d" "$(stat -c '%a %U' "$d" 2>/dev/null)" "$u"; fi"""
)


_PRECHECKS_SCRIPT = (
    # C 0: files in dpkg's journal of an unfinished run; C 1: who holds apt's or dpkg's lock;
    # C 2: the effective capabilities (hex); C 3: whether nft can read the ruleset.
    r"""printf 'C\t0\t%s\n' "$(ls -A /var/lib/dpkg/updates 2>/dev/null | wc -l)"
printf 'C\t1\t%s\n' "$(lslocks -n -r -o COMMAND,PID,PATH 2>/dev/null \
  | awk '$3 ~ /^\/var\/lib\/(dpkg\/lock|apt\/lists\/lock)/ { print $1 " (pid " $2 ")"; exit }')"
printf 'C\t2\t%s\n' "$(awk '/^CapEff:/ { print $2 }' /proc/self/status)"
if command -v nft >/dev/null 2>&1; then
if nft list tables >/dev/null 2>&1; then printf 'C\t3\t1\n'; else printf 'C\t3\t0\n'; fi; fi"""
)
_SPACE_SCRIPT = (
    # S i: free KiB and mount point, then total and free inodes, of the path's file system.
    'd={path}; while [ ! -e "$d" ]; do d=$(dirname "$d"); done\n'
    "printf 'S\\t{i}\\t%s\\t%s\\n' "
    "\"$(df -P -k \"$d\" | awk 'NR==2 {{print $4 \"\\t\" $6}}')\" "
    "\"$(df -P -i \"$d\" 2>/dev/null | awk 'NR==2 {{print $2 \"\\t\" $4}}')\""
)
CAP_NET_ADMIN = 12


def packed(text: str) -> str:
    """A shell command that runs ``text`` (a script) from a compressed copy of it.

    The state script grows with the plan (a line per managed file, a site's every file):
    passed as it is, inside the ``sh -c`` of pyinfra's connectors, with every quote escaped
    again, it reached Linux's 128 KiB limit for one argument ("Argument list too long", seen
    with the mail example). Compressed and base64-encoded (no quote to escape), it is a few
    KiB; on the target it is written to a private temporary file (tmpfs first: a full disk
    must not stop the state read that reports it) and run from there, not from stdin, which
    the script's own commands could read."""
    import gzip

    data = base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()
    return ("f=$(mktemp /dev/shm/selfhost-state.XXXXXXXX 2>/dev/null || mktemp) || exit 1; "
            f'printf %s {data} | base64 -d | gzip -dc > "$f" && sh "$f"; r=$?; rm -f "$f"; '
            "exit $r")


def script(q: Query) -> str:
    """The shell script. Every output line is ``KIND<TAB>INDEX<TAB>values...``."""
    q_ = shlex.quote
    parts = ["export LC_ALL=C"]
    # The managed files: one loop over a list of "INDEX/abs/path" lines (a path once, not a
    # command each: a site's every file is in it). A path with a newline (a site's file named
    # so) cannot be a line of the list: it gets its own command.
    listed = "".join(f"{i}{p}\n" for i, p in enumerate(q.files)
                     if "\n" not in p and p.startswith("/"))
    if listed:
        parts.append(
            "while IFS= read -r l; do i=${l%%/*}; p=/${l#*/}; "
            "if [ -f \"$p\" ]; then h=$(sha1sum < \"$p\"); printf 'F\\t%s\\t%s\\t%s\\n' \"$i\" "
            "\"${h%% *}\" \"$(stat -L -c '%a %U %G' \"$p\")\"; "
            "else printf 'F\\t%s\\t-\\n' \"$i\"; fi; "
            # A staged copy left by a deploy cut between its upload and its rename.
            "[ ! -e \"$p.selfhost-new\" ] || printf 'T\\t%s\\t1\\n' \"$i\"; "
            "done <<'SELFHOST_FILES'\n" + listed + "SELFHOST_FILES")
    for i, path in enumerate(q.files):
        if "\n" not in path and path.startswith("/"):
            continue
        parts.append(
            f"if [ -f {q_(path)} ]; then printf 'F\\t{i}\\t%s\\t%s\\n' "
            f"\"$(sha1sum < {q_(path)} | cut -c1-40)\" \"$(stat -L -c '%a %U %G' {q_(path)})\"; "
            f"else printf 'F\\t{i}\\t-\\n'; fi; "
            f"[ ! -e {q_(path + '.selfhost-new')} ] || printf 'T\\t{i}\\t1\\n'"
        )
    for i, path in enumerate(q.dirs):
        parts.append(
            f"if [ -d {q_(path)} ]; then printf 'D\\t{i}\\t-\\t%s\\n' "
            f"\"$(stat -L -c '%a %U %G' {q_(path)})\"; else printf 'D\\t{i}\\t-\\n'; fi"
        )
    if q.guards or q.units:
        # The guards and the units are read at the same time (each a background job writing
        # its own file, printed once all are done): one after the other, they were most of a
        # no-op deploy's time. Without a temporary directory, one after the other.
        # (Names of their own: other parts of the script set $d.)
        parts.append("selfhost_pd=$(mktemp -d /dev/shm/selfhost-par.XXXXXXXX 2>/dev/null || "
                     "mktemp -d \"${TMPDIR:-/tmp}/selfhost-par.XXXXXXXX\" 2>/dev/null) || "
                     "selfhost_pd=''; selfhost_pn=0\n"
                     "par() { selfhost_pn=$((selfhost_pn+1)); if [ -n \"$selfhost_pd\" ]; then "
                     "eval \"$1\" > \"$selfhost_pd/$selfhost_pn\" 2>/dev/null & "
                     "else eval \"$1\"; fi; }")
    for i, guard in enumerate(q.guards):
        parts.append("par " + q_(
            f"if ( {guard} ) >/dev/null 2>&1; then printf 'G\\t{i}\\t1\\n'; "
            f"else printf 'G\\t{i}\\t0\\n'; fi"
        ))
    if q.units:
        # A unit still starting or reloading (a deploy's restart a moment ago) is read again
        # once it settles, for up to 10 s: "activating" is not a reason to start it again.
        parts.append("active() { for _ in $(seq 20); do s=$(systemctl is-active \"$1\" "
                     "2>/dev/null); case $s in activating|reloading|deactivating) sleep 0.5;; "
                     "*) break;; esac; done; echo \"$s\"; }")
    for i, unit in enumerate(q.units):
        parts.append("par " + q_(
            f"printf 'U\\t{i}\\t%s\\t%s\\n' \"$(systemctl is-enabled {q_(unit)} 2>/dev/null)\" "
            f"\"$(active {q_(unit)})\""
        ))
    if q.packages:
        names = " ".join(q_(p) for p in q.packages)
        parts.append(
            f"dpkg-query -W -f='P\\t${{Package}}\\t${{db:Status-Abbrev}}\\n' {names} 2>/dev/null"
        )
    for i, user in enumerate(q.users):
        parts.append(
            f"if e=$(getent passwd {q_(user)}); then h=$(getent shadow {q_(user)} | cut -d: -f2); "
            f"printf 'W\\t{i}\\t%s\\t%s\\t%s\\t%s\\t%s\\n' "
            f"\"$(echo \"$e\" | cut -d: -f7)\" \"$(echo \"$e\" | cut -d: -f6)\" "
            f"\"$(id -nG {q_(user)} | tr ' ' ,)\" "
            f"\"$(echo \"$h\" | sha1sum | cut -c1-40)\" "
            # The hash's setting only (up to its last '$'), never the hash itself.
            f"\"$(echo \"$h\" | sed -n 's/^\\(\\$.*\\)\\$[^$]*$/\\1/p' | grep . || echo -)\"; "
            f"else printf 'W\\t{i}\\t-\\n'; fi"
        )
    if q.manifest:
        parts.append(f"if [ -f {q_(q.manifest)} ]; then printf 'M\\t0\\t%s\\n' "
                     f"\"$(base64 -w0 < {q_(q.manifest)})\"; fi")
    if q.upload_dir:
        parts.append(_UPLOAD_DIR_SCRIPT)
    if q.pending:
        parts.append(f"for m in {PENDING_DIR}/*; do [ -e \"$m\" ] && "
                     "printf 'N\\t0\\t%s\\n' \"${m##*/}\"; done")
    if q.prechecks:
        parts.append(_PRECHECKS_SCRIPT)
    if q.space:
        # One df for all the paths (a df, a dirname and their subshells per path were a
        # quarter of the no-op's state read): each path's nearest existing directory, by the
        # shell alone, then df -k and df -i of them all, matched line by line (nothing is
        # printed if a df did not answer for every path).
        parts.append(
            "set --; for p in " + " ".join(q_(p) for p in q.space) + "; do "
            "d=$p; while [ ! -e \"$d\" ]; do d=${d%/*}; [ -n \"$d\" ] || d=/; done; "
            "set -- \"$@\" \"$d\"; done\n"
            "{ df -P -k \"$@\" 2>/dev/null; echo '--'; df -P -i \"$@\" 2>/dev/null; } | "
            f"awk -v n={len(q.space)} " + q_(
                "$0 == \"--\" {sec = 1; r = 0; next} {r++} r == 1 {next} "
                "!sec {k[r - 2] = $4 \"\\t\" $6; nk++} sec {i[r - 2] = $2 \"\\t\" $4; ni++} "
                "END {if (nk == n) for (j = 0; j < n; j++) "
                "printf \"S\\t%d\\t%s\\t%s\\n\", j, k[j], (ni == n ? i[j] : \"\")}"))
    if q.guards or q.units:
        parts.append('wait; case $selfhost_pd in */selfhost-par.*) '
                     'cat "$selfhost_pd"/* 2>/dev/null; rm -f "$selfhost_pd"/*; '
                     'rmdir "$selfhost_pd";; esac')
    parts.append("true")
    return "\n".join(parts)


def parse(q: Query, lines: list[str]) -> State:
    st = State(
        space=dict.fromkeys(q.space),
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
        elif kind == "T" and i < len(q.files):
            st.staged.add(q.files[i])
        elif kind == "G":
            st.guards[q.guards[i]] = f[2] == "1"
        elif kind == "U":
            st.units[q.units[i]] = (f[2], f[3] if len(f) > 3 else "")
        elif kind == "W" and f[2] != "-" and len(f) >= 6:
            st.users[q.users[i]] = UserState(f[2], f[3], tuple(f[4].split(",")), f[5])
            if len(f) >= 7 and _YESCRYPT_SETTING.match(f[6]):
                st.settings[q.users[i]] = f[6]
        elif kind == "M" and q.manifest and i == 0:
            import base64
            import binascii

            try:
                st.manifest = base64.b64decode(f[2], validate=True).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                st.manifest = None
        elif kind == "N" and q.pending:
            st.pending.add(f[2])
        elif kind == "C" and q.prechecks:
            _precheck(st.prechecks, i, f[2])
        elif kind == "S" and i < len(q.space) and len(f) >= 4 and f[2].isdigit():
            inodes = f[5] if len(f) >= 6 and f[4].isdigit() and int(f[4]) > 0 else ""
            st.space[q.space[i]] = Space(int(f[2]), int(inodes) if inodes.isdigit() else None,
                                         f[3])
        elif kind == "X" and q.upload_dir and i == 0:
            if f[2] == "-":
                st.upload_dir = ""
            elif len(f) >= 5 and _SAFE_PATH.match(f[2]) and f[3] == f"700 {f[4]}":
                st.upload_dir = f[2]
    return st


def _precheck(pc: Prechecks, i: int, value: str) -> None:
    if i == 0:
        pc.dpkg_interrupted = value.isdigit() and int(value) > 0
    elif i == 1:
        pc.apt_busy = value
    elif i == 2:
        try:
            pc.net_admin = bool(int(value, 16) >> CAP_NET_ADMIN & 1)
        except ValueError:
            pc.net_admin = None
    elif i == 3:
        pc.nft_works = value == "1"
