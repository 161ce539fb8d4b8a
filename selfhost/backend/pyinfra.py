"""The thin pyinfra layer: apply a compiled :class:`~selfhost.compile.plan.Plan` to a host.

Everything the plan depends on is read in one round trip (:mod:`selfhost.state`);
operations then send commands only for what differs, so a second deploy sends none.

Safety rules implemented here:

- a managed file is uploaded next to its destination, checked with its ``validate``
  command (``sshd -t``, ``nft -c``, ``caddy validate``, ``visudo -c``...) and only then moved
  into place; if the check fails the live file is untouched and the deploy stops;
- units are reloaded (``reload-or-restart``) only when one of their files changed; sshd is
  never restarted by selfhost, so the SSH session in use survives;
- a file whose change calls for a reload is first copied to :data:`PREV_DIR`; when the reload
  (or restart) fails, or the unit is not active afterwards, the previous files are put back,
  the unit is reloaded again and the deploy stops, naming the unit, the files and the
  journal's lines (see :func:`reload_with_rollback`);
- the SSH port in use is always open in the firewall (see :class:`~selfhost.compile.Target`).

Use it from your own pyinfra deploy::

    from selfhost.backend.pyinfra import home_server
    home_server(config="servers/nas.yaml")
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import shlex
from collections.abc import Generator
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pyinfra.api.command import FileUploadCommand, StringCommand
from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host

from selfhost.apt import LOCK_TIMEOUT
from selfhost.compile import CompileError, Target, compile_fleet
from selfhost.compile.diff import (
    dir_change,
    file_change,
    missing_packages,
    unit_changes,
    user_changes,
)
from selfhost.compile.plan import (
    Directory,
    File,
    Packages,
    Plan,
    Reload,
    Removals,
    Run,
    Sync,
    UnitState,
    User,
)
from selfhost.compile.removal import MANIFEST, removal_commands, removed
from selfhost.compile.target import RELEASES
from selfhost.compose.keys import DirKeyStore, KeyStore
from selfhost.compose.resources import SECRET_MARK, ManagedFile, SecretPiece
from selfhost.models.fleet import Fleet
from selfhost.models.passwords import CryptUnavailable, WeakPassword, check_password, hash_for
from selfhost.models.server import _HASH_RE, Server
from selfhost.state import (
    PENDING_DIR,
    PREV_DIR,
    UPLOAD_DIR,
    Query,
    State,
    packed,
    parse,
    script,
)

q = shlex.quote
INLINE_MAX = 64 * 1024
"""Files whose base64 form is longer than this are uploaded, not inlined in the command
(one shell argument may not exceed 128 KiB on Linux)."""
CHPASSWD_DIR = "/run/selfhost"
"""Root-only directory (on tmpfs) where a ``user:hash`` line waits for ``chpasswd -e``."""


class TargetFacts(FactBase[dict[str, str]]):
    """Debian release and container detection, read before compiling."""

    def command(self) -> str:
        return (
            ". /etc/os-release; echo \"release=$VERSION_CODENAME\"; "
            "echo \"container=$(systemd-detect-virt -c 2>/dev/null || echo none)\"; "
            "echo \"ssh_port=${SSH_CONNECTION##* }\""
        )

    def process(self, output: list[str]) -> dict[str, str]:
        return dict(line.split("=", 1) for line in output if "=" in line)


def _get_state(query: Query) -> State:
    lines: list[str] = host.get_fact(_RawLines, script=packed(script(query)))
    return parse(query, lines)


class _RawLines(FactBase[list[str]]):
    """Output lines of the batched state script (see :mod:`selfhost.state`)."""

    def command(self, script: str) -> str:
        return script

    def process(self, output: list[str]) -> list[str]:
        return list(output)

    @staticmethod
    def default() -> list[str]:
        return []


def _install_file_cmd(path: str, content: bytes, mode: str, owner: str, group: str,
                      validate: str | None) -> str:
    """Shell: write ``content`` to a staged file, check it, then move it into place."""
    tmp = f"{path}.selfhost-new"
    b64 = base64.b64encode(content).decode()
    steps = [
        f"mkdir -p {q(str(Path(path).parent))}",
        f"echo {b64} | base64 -d > {q(tmp)}" if len(b64) <= INLINE_MAX else f"test -f {q(tmp)}",
    ]
    return " && ".join([*steps, _finish_cmd(tmp, path, mode, owner, group, validate)])


def _finish_cmd(tmp: str, path: str, mode: str, owner: str, group: str,
                validate: str | None) -> str:
    """Shell: give the staged file ``tmp`` its owner and mode, check it, move it to ``path``."""
    steps = [f"chown {q(owner)}:{q(group)} {q(tmp)}", f"chmod {mode} {q(tmp)}"]
    if validate:
        check = validate.replace("{path}", q(tmp))
        steps.append(
            f"if ! ( {check} ); then echo 'selfhost: {path}: the new version failed its check "
            f"({validate.split()[0]}); the live file was left untouched' >&2; "
            f"rm -f {q(tmp)}; exit 1; fi"
        )
    steps.append(f"mv -f {q(tmp)} {q(path)}")
    return " && ".join(steps)


def _remote_temp(state: State, dest: str) -> str | None:
    """Where pyinfra's sudo upload of ``dest`` first lands, as the login user: a file in
    that user's private upload directory (never pyinfra's default, a 0644 file in /tmp).
    ``None`` when no sudo is involved (the upload goes straight to ``dest``)."""
    if state.upload_dir is None:
        # The batched state of this deploy did not prepare it (a caller's own Query).
        state.upload_dir = _get_state(Query(upload_dir=True)).upload_dir
    if state.upload_dir is None:
        raise DeployError(
            f"cannot prepare the login user's private upload directory (~/{UPLOAD_DIR}, "
            "mode 0700, owned by that user) on the target; a secret is never uploaded "
            "through a world-readable temporary file")
    if state.upload_dir:
        return f"{state.upload_dir}/{hashlib.sha1(dest.encode()).hexdigest()[:20]}"
    args: dict[str, Any] = dict(host.current_op_global_arguments or {})
    if any(args.get(k) for k in ("_sudo", "_su_user", "_doas", "_dzdo")):
        raise DeployError("secrets can be uploaded as root or through sudo (or doas) only: "
                          "with this privilege escalation the upload would go through a "
                          "world-readable temporary file")
    return None


def _upload_secret(staged: str, data: bytes, state: State,
                   prepare: str) -> list[str | FileUploadCommand]:
    """Commands that put ``data`` into ``staged`` without it ever being world-readable or in
    a command line: ``staged`` is first created empty and 0600 (root's), then the bytes are
    uploaded onto it (sudo's ``cp`` and sftp keep the mode of an existing file; podman cp
    writes a 0600 file)."""
    temp = _remote_temp(state, staged)
    return [
        f"{prepare} && install -m 600 /dev/null {q(staged)}",
        FileUploadCommand(BytesIO(data), staged, remote_temp_filename=temp),
    ]


@operation()
def managed_file(path: str, content: bytes, mode: str, owner: str, group: str,
                 validate: str | None, state: State,
                 secret: bool = False) -> Generator[str | StringCommand | FileUploadCommand, None, None]:
    """Ensure ``path`` has exactly ``content``, ``mode`` and ownership (validated first).

    A ``secret`` file's content is uploaded, never put in a command line."""
    change = file_change(path, hashlib.sha1(content).hexdigest(), mode, owner, group, state)
    if change is None:
        host.noop(f"{path} is up to date")
        return
    if change.kind == "fix-file-meta":
        yield f"chown {q(owner)}:{q(group)} {q(path)} && chmod {mode} {q(path)}"
        return
    if secret:
        tmp = f"{path}.selfhost-new"
        yield from _upload_secret(tmp, content, state, f"mkdir -p {q(str(Path(path).parent))}")
        yield _finish_cmd(tmp, path, mode, owner, group, validate)
        return
    if len(base64.b64encode(content)) > INLINE_MAX:
        yield FileUploadCommand(BytesIO(content), f"{path}.selfhost-new")
    yield _install_file_cmd(path, content, mode, owner, group, validate)


@operation()
def managed_dir(path: str, mode: str, owner: str, group: str,
                state: State) -> Generator[str, None, None]:
    if dir_change(path, mode, owner, group, state) is None:
        host.noop(f"{path} is up to date")
        return
    yield (f"mkdir -p {q(path)} && chown {q(owner)}:{q(group)} {q(path)} "
           f"&& chmod {mode} {q(path)}")


APT_INSTALL = (Path(__file__).parent / "apt-install.sh").read_text(encoding="utf-8")
"""The script that installs packages, waiting (bounded) for a busy package manager and
finishing an interrupted dpkg run first (see ``apt-install.sh``)."""


def apt_install_cmd(names: list[str] | tuple[str, ...]) -> str:
    """Shell: ``apt-install.sh`` with the lock timeout and the packages (none: only recover
    an interrupted dpkg)."""
    return " ".join(["sh", "-c", q(APT_INSTALL), "selfhost-apt", str(LOCK_TIMEOUT),
                     *(q(n) for n in names)])


def with_early(apt_cmd: str, early: list[str]) -> str:
    """Shell: ``apt_cmd``, with the ``early`` commands (see ``Command.during_packages``) run in
    the background meanwhile, each in its own subshell, their output discarded; it waits for
    them (nothing outlives the deploy's command) and exits with ``apt_cmd``'s status."""
    if not early:
        return apt_cmd
    bg = "; ".join(f"( {e}\n)" for e in early)
    return (f"( {bg} ) </dev/null >/dev/null 2>&1 & selfhost_early=$!\n"
            f"( {apt_cmd}\n); r=$?; wait $selfhost_early; (exit $r)")


@operation()
def packages(names: tuple[str, ...], state: State) -> Generator[str, None, None]:
    """Install missing packages; run ``apt-get update`` only when something is missing.

    A dpkg run that was interrupted (``state.prechecks.dpkg_interrupted``) is finished
    first, even when nothing is missing: apt refuses to work until it is. A busy package
    manager (``state.prechecks.apt_busy``: an apt left running by a killed deploy) is waited
    for even when nothing is missing: later commands use dpkg and debconf."""
    missing = missing_packages(names, state)
    if not missing and not state.prechecks.dpkg_interrupted and not state.prechecks.apt_busy:
        host.noop("all packages installed")
        return
    yield apt_install_cmd(missing)


@operation()
def guarded(label: str, command: str, unless: str | None,
            state: State, recheck: bool = False) -> Generator[str, None, None]:
    """Run ``command`` unless its guard already holds (checked in the batched state).

    With ``recheck`` (this deploy installs packages first, so the state read before it may
    be stale: a package's postinst can do the work itself, e.g. rkhunter records its
    baseline), the guard is also tested again on the target, right before the command."""
    if unless is not None and state.guards.get(unless):
        host.noop(f"{label}: already done")
        return
    if unless is not None and recheck:
        yield f"if ( {unless}\n) >/dev/null 2>&1; then :; else ( {command}\n); fi"
        return
    yield command


@operation()
def unit_state(unit: str, enabled: bool, running: bool,
               state: State) -> Generator[str, None, None]:
    name = unit
    cmds = []
    for change in unit_changes(name, enabled, running, state):
        cmds.append(f"systemctl enable {q(name)} >/dev/null 2>&1"
                    if change.kind == "enable-unit" else f"systemctl start {q(name)}")
    if not cmds:
        host.noop(f"{name} is {'enabled and ' if enabled else ''}active")
        return
    if state.units.get(name, ("", ""))[0] == "masked":
        # Masked by hand (a unit masked cannot be enabled nor started): the model wins.
        cmds.insert(0, f"systemctl unmask {q(name)} >/dev/null")
    yield " && ".join(cmds)


def units_state(units: list[tuple[str, bool, bool]], state: State,
                recheck: bool = False) -> Generator[str, None, None]:
    """Shell: what :func:`unit_state` does for each of ``units`` (name, enabled, running), as
    one command: the units to enable in one ``systemctl enable`` (one reload of systemd's
    configuration instead of one per unit), then each start, in the plan's order.

    With ``recheck`` (this deploy installed packages: the state read before is stale, and a
    package's postinst enables its units itself), a unit is enabled only if it still is not
    (``systemctl enable`` of a unit with an init script also runs ``update-rc.d``)."""
    unmask, enable, start = [], [], []
    for name, enabled, running in units:
        kinds = [c.kind for c in unit_changes(name, enabled, running, state)]
        if kinds and state.units.get(name, ("", ""))[0] == "masked":
            unmask.append(q(name))
        if "enable-unit" in kinds:
            enable.append(q(name))
        if any(k != "enable-unit" for k in kinds):
            start.append(f"systemctl start {q(name)}")
    if not (unmask or enable or start):
        host.noop(f"{len(units)} units enabled and active as planned")
        return
    enable_cmd = f"systemctl enable {' '.join(enable)} >/dev/null 2>&1"
    if recheck and enable:
        # The same test as selfhost.compile.diff.unit_changes.
        enable_cmd = ("{ set --; for u in " + " ".join(enable) + "; do case "
                      "\"$(systemctl is-enabled \"$u\" 2>/dev/null)\" in enabled|static|alias) "
                      ";; *) set -- \"$@\" \"$u\";; esac; done; [ $# -eq 0 ] || "
                      "systemctl enable \"$@\" >/dev/null 2>&1; }")
    yield " && ".join([*([f"systemctl unmask {' '.join(unmask)} >/dev/null"] if unmask else []),
                       *([enable_cmd] if enable else []),
                       *start])


@operation()
def reload_unit(unit: str, action: str) -> Generator[str, None, None]:
    yield f"systemctl {'reload-or-restart' if action == 'reload' else 'restart'} {q(unit)}"


RESTART_WINDOW = 1
"""Seconds a restarted unit must stay active before it counts as started: a simple service
that reads its configuration after its start (fail2ban, radicale) exits a moment later."""
JOURNAL_ERRORS = "error|fail|denied|in use|timed out|invalid|cannot|can't|unable"
"""Which journal lines a failed reload's message quotes (the last ones when none match)."""
NEVER_RESTARTED = frozenset({"ssh.service", "sshd.service"})
"""Units that selfhost only ever reloads, even to bring them back (the SSH session in use)."""

_SHELL_FUNCTIONS = r"""selfhost_settled() { for _ in $(seq 40); do
s=$(systemctl is-active "$1" 2>/dev/null)
case $s in activating|reloading|deactivating) sleep 0.5;; *) break;; esac
done; echo "$s"; [ "$s" = active ]; }
selfhost_job() { wedged=0; systemctl "$2" "$1" & p=$!; n=0
while kill -0 "$p" 2>/dev/null; do sleep 0.1; n=$((n+1))
if [ "$n" -ge 30 ] && [ $((n % 5)) = 0 ] \
&& [ "$(systemctl show -p ActiveState --value "$1")" = reloading ] \
&& [ "$(systemctl show -p ControlPID --value "$1")" = 0 ]; then
kill "$p" 2>/dev/null; wait "$p"; wedged=1; return 1; fi
done; wait "$p"; }"""
"""``selfhost_settled UNIT``: wait while the unit is (re)starting or reloading, print its state,
succeed when it is active. ``selfhost_job UNIT VERB``: ``systemctl VERB UNIT``, except that a
unit left "reloading" with no reload process running (a service that said RELOADING=1 and
never READY=1 after a failed reload: Caddy 2.6 does, caddyserver/caddy#7385) fails after
3 s with ``wedged=1`` instead of waiting forever."""


def prev_path(path: str, prev_dir: str = PREV_DIR) -> str:
    """Where the previous version of the managed file ``path`` is kept until the unit it
    belongs to has been reloaded with the new one (see :func:`keep_prev_cmd`)."""
    return prev_dir + path


def keep_prev_cmd(path: str, prev_dir: str = PREV_DIR) -> str:
    """Shell: keep the current version of ``path`` (owner and mode too) in :data:`PREV_DIR`, a
    root-only directory, before the file is replaced; ``PATH.absent`` there says it did not
    exist. A version already kept stays: it is the one the unit still runs with (its reload
    is still owed, see :data:`PENDING_DIR`: a previous deploy stopped before it)."""
    prev, absent = prev_path(path, prev_dir), prev_path(path, prev_dir) + ".absent"
    return (f"install -d -m 700 {q(prev_dir)} && mkdir -p {q(str(Path(prev).parent))} && "
            f"if [ -e {q(prev)} ] || [ -e {q(absent)} ]; then :; "
            f"elif [ -f {q(path)} ]; then cp -p {q(path)} {q(prev)}; "
            f"else : > {q(absent)}; fi")


def reload_with_rollback(unit: str, action: str, files: tuple[str, ...], marker: str,
                         drop_prev: tuple[str, ...], prev_dir: str = PREV_DIR,
                         pending_dir: str = PENDING_DIR, stage: str = "all") -> str:
    """Shell: reload (or restart) ``unit``; once it is active, forget the previous versions
    of ``drop_prev`` and the pending ``marker``. When the reload fails or the unit is not
    active afterwards, put back the previous versions of ``files`` (those kept in
    :data:`PREV_DIR`), reload the unit again (restart it if it is stuck reloading, except
    :data:`NEVER_RESTARTED`), say which unit, which files and what the journal says, and fail
    (the deploy stops). The marker stays: the next deploy reloads the unit again, and replaces
    the files again if the model still asks for them.

    ``stage`` splits a restart in two, so that the units restarted by one deploy share one
    :data:`RESTART_WINDOW` instead of waiting it out one after the other: ``"restart"``
    restarts the unit and checks that it settled (rolling back at once if not), then writes
    the time into the pending marker, which stays; ``"window"`` (sent after every restart of
    the phase, after one ``sleep``) checks that the unit is still active, then forgets the
    previous versions and the marker, or rolls back. ``"all"`` does both, with its own wait."""
    verb = "reload-or-restart" if action == "reload" else "restart"
    done = "reload" if action == "reload" else "restart"
    window = f" && sleep {RESTART_WINDOW}" if action != "reload" and stage == "all" else ""
    mark = q(pending_dir + "/" + marker)
    again_window = f" && sleep {RESTART_WINDOW}" if action != "reload" else ""
    u = q(unit)
    restore = []
    for path in files:
        prev, absent = q(prev_path(path, prev_dir)), q(prev_path(path, prev_dir) + ".absent")
        new = q(path + ".selfhost-new")
        restore.append(
            f"if [ -e {prev} ]; then cp -p {prev} {new} && mv -f {new} {q(path)} && rm -f {prev} "
            f"&& back=\"$back {path}\"; elif [ -e {absent} ]; then rm -f {q(path)} {absent} "
            f"&& back=\"$back {path}(removed)\"; fi")
    forget = " ".join(q(p) for f in drop_prev
                      for p in (prev_path(f, prev_dir), prev_path(f, prev_dir) + ".absent"))
    ok = (f"rm -f {forget} && " if forget else "") + f"rm -f {q(pending_dir + '/' + marker)}"
    what = ", ".join(files)
    if unit in NEVER_RESTARTED:
        again = f"selfhost_job {u} {verb}; how='{done}ed again'"
    else:
        again = (f"if [ \"$wedged\" = 1 ]; then systemctl restart {u}; how='restarted (it was "
                 f"stuck reloading)'; else selfhost_job {u} {verb}; how='{done}ed again'; fi")
    attempt = f"selfhost_job {u} {verb}{window} && selfhost_settled {u} >/dev/null"
    start = "t0=$(date +%s)"
    if stage == "restart":
        ok = f"date +%s 2>/dev/null > {mark} || :"
    elif stage == "window":
        # The time of the restart, written by its "restart" stage (for the journal's lines).
        attempt = f"wedged=0; selfhost_settled {u} >/dev/null"
        start = f"t0=$(cat {mark} 2>/dev/null | grep -x '[0-9]*' || date +%s)"
    return "\n".join([
        _SHELL_FUNCTIONS,
        start,
        f"if {attempt}; then {ok}; else",
        "back=''",
        *restore,
        # A unit file put back is read again before the unit is.
        *(["case \"$back\" in *' /etc/systemd/'*) systemctl daemon-reload;; esac"]
          if any(p.startswith("/etc/systemd/") for p in files) else []),
        f"{again}{again_window}; if [ \"$wedged\" = 1 ]; then now=$(systemctl is-active {u}); "
        f"else now=$(selfhost_settled {u}); fi",
        f"if [ -n \"$back\" ]; then did=\"the previous version of$back was put back and "
        f"{unit} $how (now $now)\"; else did=\"no previous version was kept to put "
        f"back ({unit} is $now)\"; fi",
        f"echo \"selfhost: {unit} failed after its {done} with the new {what}: $did; "
        f"the deploy stops here. The journal of {unit} says:\" >&2",
        # The journal's error lines since the first attempt (else its last lines), cut short.
        f"j=$(journalctl -u {u} --since \"@$t0\" --no-pager -o cat 2>/dev/null); "
        f"e=$(printf '%s\\n' \"$j\" | grep -iE {q(JOURNAL_ERRORS)} | tail -n 8); "
        "printf '%s\\n' \"${e:-$(printf '%s\\n' \"$j\" | tail -n 8)}\" | cut -c1-400 "
        "| sed 's/^/selfhost:   /' >&2",
        "exit 1; fi",
    ])


@operation()
def admin_user(user: str, groups: tuple[str, ...], password_hash: str | None,
               state: State) -> Generator[str | FileUploadCommand, None, None]:
    name = user
    for change in user_changes(name, groups, password_hash, state):
        if change.kind == "user-drop-sudo":
            yield f"gpasswd -d {q(name)} sudo >/dev/null"
        elif change.kind == "create-user":
            yield ("useradd --create-home --shell /bin/bash --user-group "
                   + (f"--groups {','.join(groups)} " if groups else "") + q(name))
        elif change.kind == "user-groups":
            yield f"usermod -aG {change.detail} {q(name)}"
        elif change.kind == "user-shell":
            yield f"usermod --shell /bin/bash {q(name)}"
        elif change.kind == "user-password" and password_hash is not None:
            # The hash travels as a file, never in a command line (`ps` shows those).
            staged = f"{CHPASSWD_DIR}/chpasswd-{name}"
            yield from _upload_secret(staged, f"{name}:{password_hash}\n".encode(), state,
                                      f"install -d -m 700 {CHPASSWD_DIR}")
            yield f"chpasswd -e < {q(staged)}; rc=$?; rm -f {q(staged)}; exit $rc"


def _resolve_secret(value: str) -> str:
    """The value of a ``secret:env:VAR`` / ``secret:file:PATH`` reference of the plan."""
    from selfhost.models.base import SecretRef

    where = value.removeprefix("secret:")
    kind, _, ref = where.partition(":")
    return SecretRef(**{kind: ref}).resolve()


def _user_secrets(plan: Plan, server: Server) -> dict[str, tuple[str, str]]:
    """Every admin's password or password hash that the plan refers to, read on this machine
    and checked, by user: ``("hash", crypt_hash)`` or ``("password", plaintext)``.

    Runs before any operation, so that a missing or weak secret stops the deploy before it
    changes anything."""
    out: dict[str, tuple[str, str]] = {}
    for step in plan.steps:
        if not isinstance(step, User):
            continue
        ref = step.password or step.password_hash
        if ref is None or not ref.startswith("secret:"):
            continue
        where = ref.removeprefix("secret:")
        what = "password" if step.password else "password hash"
        try:
            value = _resolve_secret(ref)
        except LookupError as exc:
            raise DeployError(f"admin {step.name}: cannot read the {what} ({where}): {exc}; "
                              "nothing was changed") from None
        if step.password:
            try:
                check_password(value, login=step.name, hostname=server.hostname,
                               domain=server.domain, min_length=server.password_min_length)
            except WeakPassword as exc:
                raise DeployError(f"admin {step.name}: {exc} (read from {where}); nothing "
                                  "was changed") from None
            out[step.name] = ("password", value)
        else:
            if not _HASH_RE.match(value):
                raise DeployError(f"admin {step.name}: the password hash read from {where} is "
                                  "not a strong crypt hash (yescrypt $y$ or SHA-512 $6$); "
                                  "nothing was changed")
            out[step.name] = ("hash", value)
    return out


def _with_hash(step: User, secrets: dict[str, tuple[str, str]], state: State) -> User:
    """``step`` with its password as a crypt hash: the current one when the password is
    unchanged (so nothing is sent), else a new one."""
    secret = secrets.get(step.name)
    if secret is None:
        return step
    kind, value = secret
    if kind == "hash":
        return dataclasses.replace(step, password_hash=value)
    current = state.users.get(step.name)
    try:
        crypt_hash = hash_for(value, state.settings.get(step.name),
                              current.shadow_sha1 if current else None)
    except (CryptUnavailable, ValueError) as exc:
        raise DeployError(f"admin {step.name}: {exc}; nothing was changed") from None
    return dataclasses.replace(step, password_hash=crypt_hash, password=None)


def _expand_sync(step: Sync) -> list[ManagedFile]:
    src = Path(step.src)
    if not src.is_dir():
        raise DeployError(f"site source directory {src} does not exist")
    out = []
    for p in sorted(src.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(src).as_posix()
            out.append(ManagedFile(f"{step.dest}/{rel}", "", mode="0644"))
    return out


PHASES = ("packages", "removals", "prepare", "admins", "directories", "files", "commands", "units",
          "reloads")
"""Every host gets these operations, once each and in this order, whatever its plan: pyinfra
orders operations across hosts by their call sites, so a per-step operation sequence that
differs between hosts (one inventory, several models) would make its ordering graph cyclic."""


def _phase_of(step: Any) -> str:
    if isinstance(step, Packages):
        return "packages"
    if isinstance(step, Removals):
        return "removals"
    if isinstance(step, Run):
        return "commands" if step.command.late else "prepare"
    if isinstance(step, User):
        return "admins"
    if isinstance(step, Directory):
        return "directories"
    if isinstance(step, File | Sync):
        return "files"
    if isinstance(step, UnitState):
        return "units"
    return "reloads"


def _file_content(f: ManagedFile, keys: KeyStore) -> bytes:
    """The bytes of a managed file, its secrets read (and hashed) on this machine."""
    if f.secret is not None:
        try:
            return (f.secret.resolve() + "\n").encode()
        except LookupError as exc:
            raise DeployError(f"{f.path}: cannot read the secret ({f.secret.describe()}): "
                              f"{exc}; nothing was changed") from None
    if f.secret_file is not None:
        return Path(f.secret_file).expanduser().read_bytes()
    if f.host_key_of is not None:
        return _known_hosts(*f.host_key_of).encode()
    text = f.content
    for i, piece in enumerate(f.secrets):
        text = text.replace(SECRET_MARK.format(i), _secret_value(piece, keys))
    return text.encode()


def mysql_native_hash(password: str) -> str:
    """MariaDB's ``mysql_native_password`` hash of ``password``."""
    import hashlib

    inner = hashlib.sha1(password.encode()).digest()
    return "*" + hashlib.sha1(inner).hexdigest().upper()


def _secret_value(piece: SecretPiece, keys: KeyStore) -> str:
    import hmac

    from selfhost.models.passwords import bcrypt_hash

    try:
        value = piece.ref.resolve()
    except LookupError as exc:
        raise DeployError(f"cannot read the secret ({piece.ref.describe()}): {exc}; nothing "
                          "was changed") from None
    if piece.transform == "plain":
        return value
    if piece.transform == "nt-hash":
        from selfhost.models.ntlm import nt_hash

        return nt_hash(value)
    if piece.transform == "mysql-native":
        return mysql_native_hash(value)
    salt = hmac.new(keys.salt_key(), f"{piece.context}\0{value}".encode(), "sha256").digest()
    if piece.transform == "scram-sha-1":
        from selfhost.models.passwords import SCRAM_ITERATIONS, scram_sha1

        try:
            stored, server = scram_sha1(value, salt.hex()[:32])
        except ValueError as exc:
            raise DeployError(f"the secret from {piece.ref.describe()}: {exc}") from None
        return f"{SCRAM_ITERATIONS}\t{salt.hex()[:32]}\t{stored}\t{server}"
    try:
        crypted = bcrypt_hash(value, salt[:16])
    except (CryptUnavailable, ValueError) as exc:
        raise DeployError(f"the secret from {piece.ref.describe()}: {exc}") from None
    if piece.transform == "bcrypt-base64":
        return base64.b64encode(crypted.encode()).decode()
    return crypted


class Ed25519HostKey(FactBase[str]):
    """The host's public Ed25519 SSH host key line."""

    def command(self) -> str:
        return "cat /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null || true"

    def process(self, output: list[str]) -> str:
        return output[0].strip() if output else ""


def _known_hosts(peer: str, address: str, port: int) -> str:
    """A known_hosts line for ``address:port``, with the host key of the fleet host ``peer``
    read from it (it must be a host of this deploy's inventory)."""
    from pyinfra.context import inventory

    from selfhost.backup.fleet import known_hosts_line

    for h in inventory:
        if peer in (h.name, h.data.get("selfhost_host")):
            key = h.get_fact(Ed25519HostKey)
            if not key:
                raise DeployError(f"cannot read the SSH host key of {peer}")
            return known_hosts_line(address, port, key)
    raise DeployError(f"fleet host {peer!r} is not in this deploy's inventory: deploy both "
                      "hosts together (its SSH host key goes into this host's known_hosts)")


def _marker(step: Reload | Run) -> str:
    """Name of the marker that says ``step`` is owed (see :data:`PENDING_DIR`)."""
    if isinstance(step, Reload):
        return f"reload-{step.unit}"
    return "run-" + hashlib.sha1(step.command.name.encode()).hexdigest()[:16]


def owed_by_file(steps: list[Any]) -> dict[str, list[str]]:
    """For each managed file, the markers of the reloads and on-change commands its change
    calls for."""
    out: dict[str, list[str]] = {}
    for step in steps:
        paths: tuple[str, ...] = ()
        if isinstance(step, Reload):
            paths = step.when
        elif isinstance(step, Run) and step.command.on_change:
            paths = step.command.on_change
        for path in paths:
            out.setdefault(path, []).append(_marker(step))
    return out


@operation()
def plan_phase(phase: str, steps: list[Any], files: dict[str, bytes], state: State,
               changed: set[str], owed: dict[str, list[str]] | None = None,
               early: list[str] | None = None, extra: list[str] | None = None,
               ) -> Generator[str | StringCommand | FileUploadCommand, None, None]:
    """Apply the steps of one phase of the plan. ``changed`` collects the managed files that
    this deploy rewrites, so that reloads and on-change commands of later phases know.

    ``owed`` (see :func:`owed_by_file`): before a file that calls for a reload or an on-change
    command is replaced, a marker is left on the target; the reload or command removes it once
    it has run. A deploy interrupted in between leaves the marker, and the next one runs what
    it names (``state.pending``) even though the file no longer changes.

    ``early``: the ``during_packages`` commands of the commands that will run (their guard
    does not hold), started in the background while packages install; ``extra``: the
    ``with_packages`` of those commands, installed with the missing packages, if any.

    Consecutive plain commands are sent as one script (each in its own subshell, stopping at
    the first failure): one round trip instead of one per step."""
    batch: list[str] = []
    for cmd in _phase_commands(steps, files, state, changed, owed or {}, early or [],
                               extra or []):
        if isinstance(cmd, str):
            if batch and sum(len(c) for c in batch) + len(cmd) > BATCH_MAX:
                yield _join(batch)
                batch = []
            batch.append(cmd)
            continue
        if batch:
            yield _join(batch)
            batch = []
        yield cmd
    if batch:
        yield _join(batch)


BATCH_MAX = 32 * 1024
"""A batched script is sent in parts of about this size: one shell argument may not exceed
128 KiB on Linux, and the connectors quote the script once more (podman: ``sh -c`` inside
``sh -c``), so a first deploy's reloads (about 20 units of 4-8 KiB each) failed as one
script with ``Argument list too long``."""

TIMINGS_ENV = "SELFHOST_TIMINGS"
"""Set (to a file path on the target, e.g. /run/selfhost-timings) to profile a deploy: each
command of a batched script appends its milliseconds and its first line to that file."""


def _timed(c: str) -> str:
    log = os.environ.get(TIMINGS_ENV)
    if not log:
        return c
    label = q(c.strip().splitlines()[0][:100] if c.strip() else "")
    return (f"s=$(date +%s%N); ( {c}\n); r=$?; echo \"$(( ($(date +%s%N) - s) / 1000000 )) "
            f"ms\"' '{label} >> {q(log)}; (exit $r)")


JOIN_PACK = 64 * 1024
"""A script longer than this is sent compressed (:func:`selfhost.state.packed`). Batches are
split at :data:`BATCH_MAX`, but one command alone can be longer (the shared restart window of
a rich host's reloads, each unit with its rollback): compressed, it stays under Linux's
128 KiB limit for one argument ("Argument list too long")."""


def _join(commands: list[str]) -> str:
    out = (_timed(commands[0]) if len(commands) == 1
           else " && ".join(f"( {_timed(c)}\n)" for c in commands))
    return packed(out) if len(out) > JOIN_PACK else out


def _phase_commands(steps: list[Any], files: dict[str, bytes], state: State, changed: set[str],
                    owed: dict[str, list[str]], early: list[str] | None = None,
                    extra: list[str] | None = None,
                    ) -> Generator[str | StringCommand | FileUploadCommand, None, None]:
    installing = not all(state.packages.values())
    windows: list[str] = []  # the restarts' shared window, checked after the last one
    units: list[tuple[str, bool, bool]] = []
    for step in steps:
        if isinstance(step, Packages):
            missing = missing_packages(step.names, state)
            if missing:
                more = [n for n in extra or [] if n not in missing]
                yield with_early(apt_install_cmd([*missing, *more]), early or [])
            else:
                yield from packages._inner(names=step.names, state=state)
        elif isinstance(step, Removals):
            for r in removed(state.manifest, step.manifest):
                logging.getLogger("pyinfra").warning(f"selfhost: {r.describe()}")
                yield from removal_commands(r, step.purge_packages, tuple(state.packages))
        elif isinstance(step, Run):
            cmd = step.command
            if cmd.on_change:
                if changed.intersection(cmd.on_change) or _marker(step) in state.pending:
                    yield f"( {cmd.command}\n) && rm -f {q(PENDING_DIR + '/' + _marker(step))}"
            else:
                yield from guarded._inner(label=cmd.name, command=cmd.command,
                                          unless=cmd.unless, state=state, recheck=installing)
        elif isinstance(step, User):
            if step.password is not None or (step.password_hash or "").startswith("secret:"):
                raise DeployError(f"admin {step.name}: the password must be read and hashed "
                                  "first (apply_plan does it)")
            yield from admin_user._inner(user=step.name, groups=step.groups,
                                         password_hash=step.password_hash, state=state)
            home = f"/home/{step.name}"
            yield from managed_dir._inner(path=f"{home}/.ssh", mode="0700", owner=step.name,
                                          group=step.name, state=state)
            yield from _file(f"{home}/.ssh/authorized_keys",
                             "".join(k + "\n" for k in step.ssh_keys).encode(), "0600",
                             step.name, step.name, None, False, state, changed)
        elif isinstance(step, Directory):
            d = step.dir
            yield from managed_dir._inner(path=d.path, mode=d.mode, owner=d.owner, group=d.group,
                                          state=state)
        elif isinstance(step, File):
            f = step.file
            yield from _file(f.path, files[f.path], f.mode, f.owner, f.group, f.validate,
                             bool(f.secret is not None or f.secrets or f.secret_file),
                             state, changed, owed.get(f.path, []))
        elif isinstance(step, Sync):
            for mf in _expand_sync(step):
                yield from _file(mf.path, files[mf.path], mf.mode, mf.owner, mf.group, None,
                                 False, state, changed)
        elif isinstance(step, UnitState):
            # A unit whose reload this deploy owes is started by that reload (the reloads
            # phase), where a new file that makes it fail is put back (reload_with_rollback).
            marker = f"reload-{step.name}"
            owed_reload = marker in state.pending or any(
                marker in owed.get(p, []) for p in changed)
            units.append((step.name, step.enabled, step.running and not owed_reload))
        elif isinstance(step, Reload) and (changed.intersection(step.when)
                                           or _marker(step) in state.pending):
            # Even for a unit that was not running before this deploy: installing its package
            # may have started it with the package's default configuration.
            later = {p for s in steps[steps.index(step) + 1:] if isinstance(s, Reload)
                     for p in s.when}
            drop = tuple(p for p in step.when if p not in later)
            if step.action == "reload":
                yield reload_with_rollback(step.unit, step.action, step.when, _marker(step), drop)
                continue
            yield reload_with_rollback(step.unit, step.action, step.when, _marker(step), drop,
                                       stage="restart")
            windows.append(reload_with_rollback(step.unit, step.action, step.when,
                                                _marker(step), drop, stage="window"))
    if units:
        yield from units_state(units, state, recheck=installing)
    if windows:
        yield f"sleep {RESTART_WINDOW}"
        yield from windows


def _file(path: str, content: bytes, mode: str, owner: str, group: str, validate: str | None,
          secret: bool, state: State, changed: set[str], owed: list[str] | None = None,
          ) -> Generator[str | StringCommand | FileUploadCommand, None, None]:
    cmds = list(managed_file._inner(path=path, content=content, mode=mode, owner=owner,
                                    group=group, validate=validate, state=state, secret=secret))
    if not cmds and path in state.staged:
        # The file is right, but a deploy cut between staging and renaming left its copy.
        yield f"rm -f {q(path + '.selfhost-new')}"
        return
    if cmds:
        changed.add(path)
        if owed:
            # Before the file changes: what its change calls for is owed until it has run,
            # and the version a unit runs with is kept until it is reloaded with the new one.
            yield (f"mkdir -p {PENDING_DIR} && touch "
                   + " ".join(q(f"{PENDING_DIR}/{m}") for m in owed)
                   + (f" && {keep_prev_cmd(path)}"
                      if any(m.startswith("reload-") for m in owed) else ""))
    yield from cmds


def apply_plan(plan: Plan, server: Server, keys: KeyStore | None = None) -> None:
    """Apply a plan to the current host: one batched state query, then one operation per
    phase (see :data:`PHASES`), each sending commands only for what differs.

    Every secret is read (and every admin password checked and hashed) before the first
    operation, so that a missing or weak one changes nothing."""
    secrets = _user_secrets(plan, server)
    keys = keys or DirKeyStore()
    files: dict[str, bytes] = {}
    for step in plan.steps:
        if isinstance(step, File):
            files[step.file.path] = _file_content(step.file, keys)
        elif isinstance(step, Sync):
            for mf in _expand_sync(step):
                rel = mf.path.removeprefix(step.dest + "/")
                files[mf.path] = (Path(step.src) / rel).read_bytes()
    users = [s.name for s in plan.steps if isinstance(s, User)]
    query = Query(
        files=tuple([*files, *(f"/home/{u}/.ssh/authorized_keys" for u in users)]),
        dirs=tuple([s.dir.path for s in plan.steps if isinstance(s, Directory)]
                   + [f"/home/{u}/.ssh" for u in users]),
        guards=tuple(s.command.unless for s in plan.steps
                     if isinstance(s, Run) and s.command.unless),
        units=tuple(s.name for s in plan.steps if isinstance(s, UnitState)),
        packages=tuple(n for s in plan.steps if isinstance(s, Packages) for n in s.names),
        users=tuple(users),
        manifest=MANIFEST,
        upload_dir=any(isinstance(s, File) and (s.file.secret is not None or s.file.secrets
                                                 or s.file.secret_file is not None)
                       for s in plan.steps)
        or any(isinstance(s, User) and (s.password_hash or s.password) for s in plan.steps),
        prechecks=True,
        pending=True,
        space=tuple(_space_paths(plan, files, users)),
    )
    state = _get_state(query)
    if query.upload_dir and state.upload_dir is None:
        raise DeployError(
            f"cannot prepare the login user's private upload directory (~/{UPLOAD_DIR}, "
            "mode 0700) on the target, needed to upload secrets; nothing was changed")
    for problem in target_problems(plan, state, files):
        raise DeployError(problem)
    _log_waits(state)
    all_steps = [_with_hash(s, secrets, state) if isinstance(s, User) else s
                 for s in plan.steps]
    changed: set[str] = set()
    owed = owed_by_file(all_steps)
    due = [s.command for s in all_steps if isinstance(s, Run) and not s.command.late
           and not s.command.on_change and not (s.command.unless
                                                and state.guards.get(s.command.unless))]
    early = [c.during_packages for c in due if c.during_packages]
    extra = [n for c in due for n in c.with_packages]
    for phase in PHASES:
        steps = [s for s in all_steps if _phase_of(s) == phase]
        plan_phase(name=f"selfhost {phase}", phase=phase, steps=steps, files=files, state=state,
                   changed=changed, owed=owed, early=early if phase == "packages" else None,
                   extra=extra if phase == "packages" else None)


# ------------------------------------------------------------------ what the target can do
# Read in the batched state query (no extra round trip) and checked before the first
# operation: a target that cannot do what the model asks stops the deploy in one line,
# with the ways out, before anything is changed.

PACKAGE_PATHS = ("/var/cache/apt/archives", "/var/lib/dpkg", "/usr")
"""Where installing packages writes (checked for a full file system when some are missing)."""
PACKAGES_MIN_KIB = 64 * 1024
"""Free space below which installing packages is refused on any of :data:`PACKAGE_PATHS`
(apt checks its download directory itself, not where dpkg unpacks)."""
FILE_MARGIN_KIB = 64
"""Free space kept on a file system beyond the files written there (logs, dpkg's status)."""


def _space_paths(plan: Plan, files: dict[str, bytes], users: list[str]) -> list[str]:
    dirs = [s.dir.path for s in plan.steps if isinstance(s, Directory)]
    keys = [f"/home/{u}/.ssh/authorized_keys" for u in users]
    out: list[str] = []
    for path in [*files, *keys, *dirs, *PACKAGE_PATHS]:
        if path not in out:
            out.append(path)
    return out


def _kib(n: int) -> int:
    return (n + 1023) // 1024


def target_problems(plan: Plan, state: State, files: dict[str, bytes]) -> list[str]:
    """Why this target cannot take this plan (one line each, with the ways out); empty when
    it can. Reads only the batched state (``Query(prechecks=True, space=...)``)."""
    from selfhost.hardening.firewall import NFTABLES_CONF

    out: list[str] = []
    pc = state.prechecks
    if any(isinstance(s, File) and s.file.path == NFTABLES_CONF for s in plan.steps) and (
            pc.net_admin is False or pc.nft_works is False):
        why = ("this deploy runs without CAP_NET_ADMIN" if pc.net_admin is False
               else "`nft list tables` fails here")
        out.append(
            f"the firewall cannot be applied on this target: {why}, so nft fails with "
            "'Operation not permitted' (a container started without that capability?). "
            "Either give it the capability (podman/docker run --cap-add NET_ADMIN) or turn "
            "the control off in the model (hardening: {firewall: {enabled: false, reason: "
            "...}}). Nothing was changed")
    # Free space: what this deploy writes on each file system, against what is free there.
    need: dict[str, list[int]] = {}  # mount -> [KiB, inodes, example path]
    where: dict[str, str] = {}
    for path, content in files.items():
        current = state.files.get(path)
        if current is not None and current.sha1 == hashlib.sha1(content).hexdigest():
            continue
        space = state.space.get(path)
        if space is None:
            continue
        n = need.setdefault(space.mount, [FILE_MARGIN_KIB, 0])
        n[0] += _kib(len(content)) + 4
        n[1] += 1 if current is None else 0
        where.setdefault(space.mount, path)
    if not all(state.packages.values()):
        for path in PACKAGE_PATHS:
            space = state.space.get(path)
            if space is not None:
                n = need.setdefault(space.mount, [FILE_MARGIN_KIB, 0])
                n[0] = max(n[0], PACKAGES_MIN_KIB)
                where.setdefault(space.mount, path)
    spaces = {s.mount: s for s in state.space.values() if s is not None}
    for mount, (kib, inodes) in sorted(need.items()):
        space = spaces[mount]
        if space.avail_kib < kib:
            out.append(
                f"the file system of {where[mount]} (mounted on {mount}) is full: "
                f"{space.avail_kib} KiB free, this deploy needs about {kib} KiB there "
                "(files are written next to their destination before they replace it). "
                "Free some space and deploy again. Nothing was changed")
        elif space.free_inodes is not None and space.free_inodes < inodes + 16:
            out.append(
                f"the file system of {where[mount]} (mounted on {mount}) has no free inodes "
                f"left ({space.free_inodes}; this deploy creates {inodes} files there). "
                "Remove some files and deploy again. Nothing was changed")
    return out


def _log_waits(state: State) -> None:
    """Say up front when the packages phase is going to wait or to repair dpkg."""
    log = logging.getLogger("pyinfra")
    pc = state.prechecks
    if pc.dpkg_interrupted and not pc.apt_busy:
        log.warning("selfhost: dpkg was interrupted (a crash or a killed run): the deploy "
                    "runs `dpkg --configure -a` first")
    if pc.apt_busy:
        log.warning(f"selfhost: the package manager is busy (held by {pc.apt_busy}): the "
                    f"deploy waits for it, up to {LOCK_TIMEOUT // 60} minutes")


ASKPASS_TOKEN = "selfhost-askpass-file"
"""What pyinfra puts in its ``PYINFRA_SUDO_PASSWORD=`` command-line variable once
:func:`private_sudo` has run: a fixed word, not the password."""

_ASKPASS_SETUP = r"""umask 077
d="${XDG_RUNTIME_DIR:-}"
if [ -z "$d" ] || [ ! -d "$d" ] || [ ! -O "$d" ]; then d="${TMPDIR:-/tmp}"; fi
f="$(mktemp "$d/selfhost-askpass-XXXXXXXXXXXX")" && chmod 700 "$f" && echo "$f"
"""


def close_file_transfer(connector: Any) -> None:
    """Close pyinfra's SFTP channel of ``connector`` (it reopens one when it needs it).

    pyinfra keeps that channel open for the rest of the run once a file was sent (its
    ``get_file_transfer_connection`` is memoized). Every channel is a session for sshd, and
    selfhost's hardening sets ``MaxSessions 2``: with the askpass upload's channel left open,
    one command's session not yet closed on the server was enough for the next command's
    channel to be refused ("Secsh channel open FAILED: Connect failed", seen once in the
    ``ssh`` scenario's cut-connection test on Debian 13)."""
    getter = getattr(type(connector), "get_file_transfer_connection", None)
    cache = getattr(getter, "cache", None)
    if not isinstance(cache, dict):
        return
    client = cache.pop(f"{(connector,)}{{}}", None)  # pyinfra's memoize key: f"{args}{kwargs}"
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


def private_sudo() -> None:
    """Keep the sudo password of the current host out of every command line.

    pyinfra hands a sudo password to its askpass helper as ``env PYINFRA_SUDO_PASSWORD=...
    sudo -A ...``: the password is in the command line of the login shell on the target, which
    any local user can read in /proc while the command runs (selfhost's ``ssh`` scenario saw it
    there). Here the password goes into the askpass program itself: an empty 0700 file of the
    login user, made by ``mktemp`` in its runtime directory (tmpfs, emptied at logout; else its
    ``$TMPDIR``), then filled over SFTP (which keeps the mode of an existing file). pyinfra
    uses that program as its (cached) askpass helper, is given :data:`ASKPASS_TOKEN` instead of
    the password, and removes the helper when it disconnects.

    Called first by :func:`home_server`; in your own deploy file, call it before your own
    operations, and outside any ``@deploy`` function (a deploy copies the sudo arguments it
    starts with). It does nothing without sudo, without a sudo password (from host data
    ``_sudo_password`` or ``--same-sudo-password``), or over a connector that is not SSH."""
    if not host.data.get("_sudo") or type(host.connector).__name__ != "SSHConnector":
        return
    from pyinfra.context import config

    password = host.data.get("_sudo_password") or getattr(config, "SUDO_PASSWORD", None)
    if not password or password == ASKPASS_TOKEN:
        return
    ok, out = host.run_shell_command(StringCommand(_ASKPASS_SETUP))
    path = out.stdout_lines[-1].strip() if ok and out.stdout_lines else ""
    if not path.startswith("/"):
        raise DeployError("cannot create a private askpass file for sudo on the target "
                          f"(mktemp in the runtime or temporary directory): {out.stderr}")
    program = f"#!/bin/sh\nprintf '%s\\n' {q(str(password))}\n".encode()
    if not host.put_file(BytesIO(program), path):
        host.run_shell_command(StringCommand("rm", "-f", path))
        raise DeployError(f"cannot upload the sudo askpass program to {path}")
    # pyinfra caches its askpass helper per temporary directory ("sudo_askpass_path__DIR",
    # "sudo_askpass_path" in older releases); with neither key matching, it would make its own helper,
    # which prints the token: sudo then fails, the password is still never in a command line.
    close_file_transfer(host.connector)
    host.connector_data["sudo_askpass_path"] = path
    temp_dir = host.get_temp_dir_config()  # type: ignore[no-untyped-call]
    host.connector_data[f"sudo_askpass_path__{temp_dir}"] = path
    host.data._sudo_password = ASKPASS_TOKEN
    outer = dict(cast(dict[str, Any], host.current_deploy_kwargs or {})).get("_sudo_password")
    if outer and outer != ASKPASS_TOKEN:
        logging.getLogger("pyinfra").warning(
            "selfhost: called inside a @deploy that started with the sudo password: its "
            "operations still pass it in a command line; call private_sudo() or home_server() "
            "outside any @deploy")


def target_for_host() -> Target:
    """Read what the compiler needs to know about the current host."""
    # Without sudo: sudo drops SSH_CONNECTION, which tells the server-side port in use (a
    # forwarded or NATed port on the client side says nothing about the server).
    facts = host.get_fact(TargetFacts, _sudo=False)
    release = facts.get("release", "")
    if release not in RELEASES:
        raise DeployError(f"selfhost supports Debian {', '.join(RELEASES)}; "
                          f"this host runs {release or 'something else'!r}")
    keep: tuple[int, ...] = ()
    if type(host.connector).__name__ == "SSHConnector":
        port = facts.get("ssh_port", "")
        keep = (int(port) if port.isdigit() else int(host.data.get("ssh_port") or 22),)
    return Target(release=release, in_container=facts.get("container", "none") != "none",
                  keep_open_ports=keep)


_LOADED: dict[tuple[str, int, int], tuple[Fleet, Any]] = {}
"""Models already loaded (and prepared) in this pyinfra run, by file: pyinfra runs the deploy
once per host, and a fleet file is read, validated and routed once, not once per host."""


def load(config: str | Path) -> Fleet:
    """The fleet (or one-server) model of ``config``; errors are logged as FILE:LINE:COL."""
    return _load_prepared(config)[0]


def _load_prepared(config: str | Path) -> tuple[Fleet, Any]:
    from selfhost.compile import prepare

    p = Path(config).resolve()
    try:
        st = p.stat()
        key = (str(p), st.st_mtime_ns, st.st_size)
    except OSError:
        key = (str(p), 0, 0)
    if key not in _LOADED:
        fleet = _load_fleet(config)
        try:
            _LOADED[key] = (fleet, prepare(fleet))
        except CompileError as exc:
            raise DeployError(f"the model cannot be compiled: {exc}") from None
    return _LOADED[key]


def _load_fleet(config: str | Path) -> Fleet:
    from selfhost.config import ConfigError, load_fleet

    try:
        return load_fleet(config)
    except ConfigError as exc:
        for issue in exc.issues:
            logging.getLogger("pyinfra").error(issue.format())
        raise DeployError(f"{config}: {len(exc.issues)} error(s) in the model") from None


def fleet_host(fleet: Fleet, name: str | None = None) -> str:
    """Which host of the fleet the current pyinfra host is: host data ``selfhost_host``, else
    the inventory name (or the model's host name / FQDN), else the only host."""
    wanted = name or host.data.get("selfhost_host")
    for candidate in ([wanted] if wanted else [host.name]):
        found = fleet.find(str(candidate))
        if found is not None:
            return found
    if not wanted and len(fleet.hosts) == 1:
        return next(iter(fleet.hosts))
    raise DeployError(f"{wanted or host.name!r} is not a host of the model (hosts: "
                      f"{', '.join(sorted(fleet.hosts))}); set host data selfhost_host")


def home_server(config: str | None = None, model: Fleet | Server | None = None,
                name: str | None = None) -> None:
    """Deploy this host's part of a model: from the file ``config`` (default: host data
    ``selfhost_config``), or a model built in Python (``model``: a Fleet or a Server). In a
    fleet, ``name`` (default: host data ``selfhost_host``, else the inventory name) says
    which host this is."""
    prepared = None
    if model is None:
        path = config or host.data.get("selfhost_config")
        if not path:
            raise DeployError("no model: pass config=... or model=..., or set host data "
                              "selfhost_config")
        fleet, prepared = _load_prepared(path)
    else:
        fleet = model if isinstance(model, Fleet) else Fleet.of(model)
    # Before the deploy context: pyinfra's @deploy copies the sudo arguments it starts with.
    private_sudo()
    cast(Any, _deploy_server)(fleet, prepared, name)


@deploy("selfhost home server")
def _deploy_server(fleet: Fleet, prepared: Any, name: str | None) -> None:
    me = fleet_host(fleet, name)
    keys = DirKeyStore()
    try:
        plan = compile_fleet(fleet, {me: target_for_host()}, keys, hosts=[me],
                             prepared=prepared)[me]
    except CompileError as exc:
        raise DeployError(f"the model cannot be compiled: {exc}") from None
    for notice in plan.notices:
        logging.getLogger("pyinfra").warning(f"selfhost: {notice}")
    apply_plan(plan, fleet.hosts[me], keys)
