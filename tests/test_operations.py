"""The custom pyinfra operations, in pyinfra's own test style: operation arguments + host state
-> commands. Operations are called through their undecorated generator (``op._inner``) inside
a real pyinfra State/Host context (an ``@local`` inventory, never connected).

The commands that change files are then run for real with /bin/sh in tmp_path, and the state
read back with the real state script, so "install then re-read -> no-op" is checked end to end.
Finally ``apply_plan`` is run against a real pyinfra State to check its wiring (which ops,
which conditions) and that a converged host gets no commands at all.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import grp
import hashlib
import logging
import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import Config, FileUploadCommand, Inventory, StringCommand
from pyinfra.api import State as PyinfraState
from pyinfra.context import ctx_config, ctx_host, ctx_inventory, ctx_state
from validators import Validators

from selfhost.backend import pyinfra as backend
from selfhost.compile import Target, compile_server
from selfhost.compile.plan import (
    Directory,
    File,
    Packages,
    Reload,
    Run,
    Sync,
    UnitState,
    User,
)
from selfhost.hardening.firewall import FirewallHardening
from selfhost.models import Server
from selfhost.state import (
    FileState,
    Prechecks,
    Query,
    Space,
    State,
    UserState,
    parse,
    script,
)

ROOT = Path(__file__).resolve().parent.parent
ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name
ALICE = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P "
         "alice@laptop")


@contextlib.contextmanager
def fresh_pyinfra() -> Iterator[Any]:
    """A real pyinfra host in a new State, set as the current context (not connected)."""
    inventory = Inventory((["@local"], {}))
    state = PyinfraState(inventory, Config())
    host = inventory.get_host("@local")
    with ctx_state.use(state), ctx_inventory.use(inventory), ctx_config.use(state.config), \
            ctx_host.use(host):
        yield host


@pytest.fixture
def pyinfra_host(caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    caplog.set_level(logging.DEBUG, logger="pyinfra")
    with fresh_pyinfra() as host:
        yield host


def commands(op: Any, **kwargs: Any) -> list[str]:
    """The commands an operation yields, unmasked, as the shell would receive them."""
    out = []
    for cmd in op._inner(**kwargs):
        out.append(cmd.get_raw_value() if isinstance(cmd, StringCommand) else cmd)
    return out


def noops(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split("noop: ", 1)[1] for r in caplog.records
            if "noop: " in r.getMessage()]


def sh(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=30)


def read_state(q: Query) -> State:
    """The host state, read with the real batched script."""
    res = sh(script(q))
    assert res.returncode == 0, res.stderr
    return parse(q, res.stdout.splitlines())


def mode_of(path: Path) -> str:
    return f"{path.stat().st_mode & 0o7777:04o}"


def file_kwargs(path: Path, content: bytes, mode: str = "0640",
                validate: str | None = None) -> dict[str, Any]:
    return {"path": str(path), "content": content, "mode": mode, "owner": ME,
            "group": MY_GROUP, "validate": validate}


# --------------------------------------------------------------------------------------------
# managed_file


def test_managed_file_installs_a_missing_file(pyinfra_host: Any, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "etc" / "app" / "app.conf"
    kw = file_kwargs(path, b"key = value\n")
    cmds = commands(backend.managed_file, **kw, state=read_state(Query(files=(str(path),))))
    assert len(cmds) == 1
    res = sh(cmds[0])
    assert res.returncode == 0, res.stderr
    assert path.read_bytes() == b"key = value\n"
    assert mode_of(path) == "0640"
    assert sorted(p.name for p in path.parent.iterdir()) == ["app.conf"]  # no staged leftovers

    # Re-read the real state: nothing left to do.
    assert commands(backend.managed_file, **kw, state=read_state(Query(files=(str(path),)))) \
        == []
    assert noops(caplog) == [f"{path} is up to date"]


def test_a_staged_copy_left_by_a_cut_deploy_is_removed(pyinfra_host: Any,
                                                       tmp_path: Path) -> None:
    # Seen in the ssh scenario: the connection cut between staging the Caddyfile and renaming
    # it left Caddyfile.selfhost-new; the next deploy found the file itself up to date and
    # left the copy behind for good.
    path = tmp_path / "app.conf"
    kw = file_kwargs(path, b"key = value\n")
    assert sh(commands(backend.managed_file, **kw,
                       state=read_state(Query(files=(str(path),))))[0]).returncode == 0
    staged = tmp_path / "app.conf.selfhost-new"
    staged.write_bytes(b"key = other\n")
    state = read_state(Query(files=(str(path),)))
    assert state.staged == {str(path)}
    cmds = list(backend._file(str(path), b"key = value\n", "0640", ME, MY_GROUP, None, False,
                              state, set()))
    assert cmds == [f"rm -f {staged}"]
    assert sh(cmds[0]).returncode == 0 and not staged.exists()
    assert path.read_bytes() == b"key = value\n"
    again = read_state(Query(files=(str(path),)))
    assert again.staged == set()
    assert list(backend._file(str(path), b"key = value\n", "0640", ME, MY_GROUP, None, False,
                              again, set())) == []


def test_managed_file_fixes_only_mode_when_content_matches(pyinfra_host: Any,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "app.conf"
    path.write_bytes(b"same\n")
    path.chmod(0o666)
    kw = file_kwargs(path, b"same\n", mode="0600")
    cmds = commands(backend.managed_file, **kw, state=read_state(Query(files=(str(path),))))
    assert cmds == [f"chown {ME}:{MY_GROUP} {path} && chmod 0600 {path}"]
    assert sh(cmds[0]).returncode == 0
    assert mode_of(path) == "0600"
    assert commands(backend.managed_file, **kw,
                    state=read_state(Query(files=(str(path),)))) == []


def test_managed_file_replaces_changed_content(pyinfra_host: Any, tmp_path: Path) -> None:
    path = tmp_path / "app.conf"
    path.write_bytes(b"old\n")
    kw = file_kwargs(path, b"new\n", mode="0644")
    cmds = commands(backend.managed_file, **kw, state=read_state(Query(files=(str(path),))))
    assert len(cmds) == 1 and "base64 -d" in cmds[0]
    assert sh(cmds[0]).returncode == 0
    assert path.read_bytes() == b"new\n" and mode_of(path) == "0644"


def test_failed_validation_leaves_the_live_file_untouched(pyinfra_host: Any,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "sshd_config"
    path.write_bytes(b"good config\n")
    path.chmod(0o600)
    kw = file_kwargs(path, b"broken config\n", mode="0600",
                     validate="grep -q '^good' {path}")
    (cmd,) = commands(backend.managed_file, **kw, state=read_state(Query(files=(str(path),))))
    res = sh(cmd)
    assert res.returncode != 0
    assert "failed its check (grep); the live file was left untouched" in res.stderr
    assert path.read_bytes() == b"good config\n"
    assert mode_of(path) == "0600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sshd_config"]


def test_validation_checks_the_staged_file_before_it_goes_live(pyinfra_host: Any,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "app.conf"
    path.write_bytes(b"old\n")
    # Passes only if {path} is the new version and the live file is still the old one.
    validate = f"grep -qx new {{path}} && grep -qx old {path}"
    (cmd,) = commands(backend.managed_file, **file_kwargs(path, b"new\n", validate=validate),
                      state=State(files={str(path): None}))
    res = sh(cmd)
    assert res.returncode == 0, res.stderr
    assert path.read_bytes() == b"new\n"


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_failed_nft_check_keeps_the_old_ruleset(pyinfra_host: Any, release: str,
                                                validators: Validators) -> None:
    """The real validator, on the real system: a broken ruleset never replaces the live one.
    The backend's own commands run as root in a container of each release."""
    path = "/etc/selfhost-test/nftables.conf"
    good = b"table inet selfhost {\n\tchain input { type filter hook input priority 0; }\n}\n"
    assert validators.run(release, f"mkdir -p /etc/selfhost-test && cat > {path}",
                          good).returncode == 0
    bad = good.replace(b"priority 0;", b"priority 0; policy dorp;")
    kw = {"path": path, "mode": "0700", "owner": "root", "group": "root",
          "validate": "nft -c -f {path}", "state": State(files={path: None})}
    (cmd,) = commands(backend.managed_file, content=bad, **kw)
    res = validators.run(release, cmd)
    assert res.returncode != 0
    assert b"failed its check (nft); the live file was left untouched" in res.stderr
    assert validators.run(release, f"cat {path}").stdout == good
    (cmd,) = commands(backend.managed_file, content=good + b"# ok\n", **kw)
    res = validators.run(release, cmd)
    assert res.returncode == 0, res.stderr
    assert validators.run(release, f"cat {path}; stat -c %a {path}").stdout \
        == good + b"# ok\n700\n"


@pytest.mark.parametrize("content", [b"", b"no newline", bytes(range(256)) * 8,
                                     "héllo ✓\n".encode()],
                         ids=["empty", "no-newline", "binary", "utf8"])
def test_managed_file_is_byte_exact(pyinfra_host: Any, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "it's a \"file\" $(x)"
    (cmd,) = commands(backend.managed_file, **file_kwargs(path, content),
                      state=State(files={str(path): None}))
    res = sh(cmd)
    assert res.returncode == 0, res.stderr
    assert path.read_bytes() == content
    state = read_state(Query(files=(str(path),)))
    assert state.files[str(path)] == FileState(hashlib.sha1(content).hexdigest(), "0640", ME,
                                               MY_GROUP)


def test_large_file_can_be_installed(pyinfra_host: Any, tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    content = os.urandom(200_000)
    upload, cmd = commands(backend.managed_file, **file_kwargs(path, content),
                           state=State(files={str(path): None}))
    # Too large to travel inside a shell argument: uploaded next to the file, then installed.
    assert isinstance(upload, FileUploadCommand)
    assert upload.dest == f"{path}.selfhost-new"
    assert len(cmd) < 4096
    Path(upload.dest).write_bytes(upload.src.getvalue())
    res = sh(cmd)
    assert res.returncode == 0, res.stderr
    assert path.read_bytes() == content


def shown(cmds: list[Any]) -> list[Any]:
    """Commands as comparable data: an upload becomes ("upload", dest, bytes, temp file)."""
    return [("upload", c.dest, c.src.getvalue(), c.remote_temp_filename)
            if isinstance(c, FileUploadCommand) else c for c in cmds]


def fake_sudo_upload(upload: FileUploadCommand) -> None:
    """What pyinfra's SSH connector does with _sudo: sftp the bytes to the temporary file as
    the login user, `cp` it onto the destination with sudo, remove the temporary file."""
    temp = Path(upload.remote_temp_filename)
    temp.write_bytes(upload.src.getvalue())
    assert sh(f"cp {temp} '{upload.dest}' && rm -f {temp}").returncode == 0


def test_secret_file_is_uploaded_never_in_a_command_line(pyinfra_host: Any,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "restic-password"
    upload_dir = tmp_path / "upload"
    upload_dir.mkdir(mode=0o700)
    content = b"correct horse battery staple\n"
    kw = file_kwargs(path, content, mode="0640")
    cmds = list(backend.managed_file._inner(
        **kw, state=State(files={str(path): None}, upload_dir=str(upload_dir)), secret=True))
    staged = f"{path}.selfhost-new"
    assert len(cmds) == 3
    prepare, upload, finish = cmds
    # The secret travels only as an upload, in no shell command (not even base64 or masked).
    assert isinstance(upload, FileUploadCommand)
    assert upload.src.getvalue() == content and upload.dest == staged
    # Through the login user's private directory, not a 0644 file in /tmp.
    assert Path(upload.remote_temp_filename).parent == upload_dir
    import base64

    for cmd in (prepare, finish):
        assert isinstance(cmd, str)
        for needle in (b"correct horse", base64.b64encode(content)):
            assert needle.decode() not in cmd
    # The staged file exists, empty and 0600, before the bytes arrive.
    assert prepare == f"mkdir -p {path.parent} && install -m 600 /dev/null {staged}"
    assert sh(prepare).returncode == 0
    assert Path(staged).read_bytes() == b"" and mode_of(Path(staged)) == "0600"
    fake_sudo_upload(upload)
    assert mode_of(Path(staged)) == "0600"  # cp onto an existing file keeps its mode
    assert sorted(p.name for p in upload_dir.iterdir()) == []
    res = sh(finish)
    assert res.returncode == 0, res.stderr
    assert path.read_bytes() == content and mode_of(path) == "0640"
    assert not Path(staged).exists()
    # Installed: nothing more to do.
    assert commands(backend.managed_file, **kw, secret=True,
                    state=read_state(Query(files=(str(path),)))) == []


def test_secret_file_is_checked_before_it_goes_live(pyinfra_host: Any, tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"old\n")
    cmds = list(backend.managed_file._inner(
        **file_kwargs(path, b"new\n", mode="0600", validate="grep -qx old {path}"),
        state=State(files={str(path): None}, upload_dir=""), secret=True))
    assert sh(cmds[0]).returncode == 0
    Path(cmds[1].dest).write_bytes(cmds[1].src.getvalue())
    assert cmds[1].remote_temp_filename is None  # no sudo: straight to the staged file
    assert sh(cmds[2]).returncode != 0
    assert path.read_bytes() == b"old\n"


def test_secret_upload_without_a_private_directory_is_refused(
        pyinfra_host: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = file_kwargs(tmp_path / "key", b"secret\n", mode="0600")
    # Not prepared by the batched state: asked for once more, then refused.
    asked: list[Query] = []

    def no_dir(q: Query) -> State:
        asked.append(q)
        return State()

    monkeypatch.setattr(backend, "_get_state", no_dir)
    with pytest.raises(backend.DeployError, match="private upload directory"):
        list(backend.managed_file._inner(**kw, state=State(), secret=True))
    assert asked == [Query(upload_dir=True)]
    # Prepared by that second query (a caller whose own Query did not ask for it).
    monkeypatch.setattr(backend, "_get_state", lambda q: State(upload_dir="/home/a/.cache/u"))
    cmds = list(backend.managed_file._inner(**kw, state=State(), secret=True))
    assert cmds[1].remote_temp_filename.startswith("/home/a/.cache/u/")
    # No directory because no sudo, but the operation escalates anyway (su): refused.
    monkeypatch.setattr(pyinfra_host, "current_op_global_arguments", {"_su_user": "root"})
    with pytest.raises(backend.DeployError, match="world-readable"):
        list(backend.managed_file._inner(**kw, state=State(upload_dir=""), secret=True))


# --------------------------------------------------------------------------------------------
# managed_dir


def test_managed_dir(pyinfra_host: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "srv" / "www" / "site one"
    kw = {"path": str(path), "mode": "0750", "owner": ME, "group": MY_GROUP}
    (cmd,) = commands(backend.managed_dir, **kw, state=read_state(Query(dirs=(str(path),))))
    assert sh(cmd).returncode == 0
    assert path.is_dir() and mode_of(path) == "0750"
    assert commands(backend.managed_dir, **kw, state=read_state(Query(dirs=(str(path),)))) == []
    assert noops(caplog) == [f"{path} is up to date"]
    path.chmod(0o777)
    (cmd,) = commands(backend.managed_dir, **kw, state=read_state(Query(dirs=(str(path),))))
    assert sh(cmd).returncode == 0 and mode_of(path) == "0750"


# --------------------------------------------------------------------------------------------
# packages, guarded commands, units, reloads


def test_packages(pyinfra_host: Any, caplog: pytest.LogCaptureFixture) -> None:
    names = ("caddy", "nftables", "sudo")
    assert commands(backend.packages, names=names,
                    state=State(packages=dict.fromkeys(names, True))) == []
    assert noops(caplog) == ["all packages installed"]
    (cmd,) = commands(backend.packages, names=names,
                      state=State(packages={"caddy": False, "nftables": True, "sudo": False}))
    assert cmd == f"sh -c {shlex.quote(backend.APT_INSTALL)} selfhost-apt 600 caddy sudo"
    # a package the state does not mention counts as missing
    assert commands(backend.packages, names=("fail2ban",), state=State())[0].endswith(
        " 600 fail2ban")
    # an interrupted dpkg is finished even when nothing is missing (apt refuses to work before)
    interrupted = State(packages=dict.fromkeys(names, True),
                        prechecks=Prechecks(dpkg_interrupted=True))
    assert commands(backend.packages, names=names, state=interrupted) == [
        f"sh -c {shlex.quote(backend.APT_INSTALL)} selfhost-apt 600"]
    # so is a busy one: the commands that follow use dpkg and debconf
    busy = State(packages=dict.fromkeys(names, True),
                 prechecks=Prechecks(apt_busy="apt-get (pid 7)"))
    assert commands(backend.packages, names=names, state=busy) == [
        f"sh -c {shlex.quote(backend.APT_INSTALL)} selfhost-apt 600"]


def test_every_apt_get_of_the_deploy_waits_for_the_dpkg_lock() -> None:
    # The packages phase goes through apt-install.sh; guarded commands use APT_GET.
    plan = compile_server(Server.model_validate({
        "hostname": "nas", "domain": "home.arpa", "admins": [{"name": "alice",
                                                              "ssh_keys": [ALICE]}]}))
    runs = [s.command.command for s in plan.steps if isinstance(s, Run)]
    calls = [c for c in runs if "apt-get" in c]
    assert len(calls) >= 2  # time sync, removal of unneeded packages
    for c in calls:
        for m in re.finditer(r"apt-get( -o [^ ]+)*", c):
            assert "-o DPkg::Lock::Timeout=600" in m.group(), c
    script_calls = re.findall(r"^.*apt-get.*$", backend.APT_INSTALL, re.MULTILINE)
    installs = [c for c in script_calls if "install -y" in c]
    assert installs
    # The script's apt-get and dpkg calls are retried by its own loop, which checks between
    # attempts that no newer deploy took over (an apt waiting inside its own lock timeout
    # could not): each of them goes through retry_locked.
    assert "Lock::Timeout" not in "".join(c for c in script_calls if not c.startswith("#"))
    calls_in_script = re.findall(r"^(?:retry_locked )?(?:apt-get|dpkg) .*$", backend.APT_INSTALL,
                                 re.MULTILINE)
    assert calls_in_script and all(c.startswith("retry_locked") for c in calls_in_script)


APT_LOCKED = ("E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 42 "
              "(unattended-upgr)")


def _fake_tools(tmp_path: Path, busy_runs: int, message: str = APT_LOCKED) -> Path:
    """apt-get and lslocks stand-ins: apt-get fails with ``message`` (a lock message) the
    first ``busy_runs`` times, then logs its arguments and succeeds."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "apt-get").write_text(
        "#!/bin/sh\n"
        f"n=$(cat {tmp_path}/count 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/count\n"
        f"if [ \"$n\" -lt {busy_runs} ]; then\n"
        f"  echo '{message}' >&2; exit 100; fi\n"
        f'echo "apt-get $*" >> {tmp_path}/log\n')
    (bin_ / "lslocks").write_text(
        "#!/bin/sh\necho 'unattended-upgr 42 /var/lib/dpkg/lock-frontend'\n")
    for tool in bin_.iterdir():
        tool.chmod(0o755)
    return bin_


def _apt_install(tmp_path: Path, bin_: Path, timeout: int, *names: str) -> Any:
    return subprocess.run(["sh", "-c", backend.APT_INSTALL, "selfhost-apt", str(timeout), *names],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}",
                               "SELFHOST_APT_OWNER": str(tmp_path / "owner")})


@pytest.mark.parametrize("message", [
    APT_LOCKED,
    # dpkg's own messages (1.21, Debian 12; 1.22, Debian 13: seen in the faults scenario)
    "dpkg: error: dpkg frontend lock was locked by another process with pid 42",
    "dpkg: error: dpkg frontend lock was locked by <unknown> process with pid 435",
])
def test_apt_install_waits_for_a_busy_package_manager(tmp_path: Path, message: str) -> None:
    bin_ = _fake_tools(tmp_path, busy_runs=1, message=message)
    done = _apt_install(tmp_path, bin_, 60, "caddy", "sudo")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ("selfhost: the package manager is busy (held by "
                                   "unattended-upgr (pid 42)): waiting up to 60s for it")
    log = (tmp_path / "log").read_text().splitlines()
    assert log[0].startswith("apt-get update -qq")
    assert log[1].startswith("apt-get install -y -qq --no-install-recommends -o Acquire")
    assert log[1].endswith(" caddy sudo")


def test_apt_install_gives_up_after_its_timeout(tmp_path: Path) -> None:
    bin_ = _fake_tools(tmp_path, busy_runs=1000)
    done = _apt_install(tmp_path, bin_, 3, "caddy")
    assert done.returncode == 1
    assert "still busy after 3s" in done.stderr and "Could not get lock" in done.stderr
    assert not (tmp_path / "log").exists()


def test_apt_install_gives_way_to_a_newer_run(tmp_path: Path) -> None:
    # A run left waiting by a killed deploy stops, without installing, once a newer run has
    # written its own token (it would otherwise install an older model's packages later).
    bin_ = _fake_tools(tmp_path, busy_runs=1000)
    owner = tmp_path / "owner"
    proc = subprocess.Popen(["sh", "-c", backend.APT_INSTALL, "selfhost-apt", "60", "caddy"],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}",
                                 "SELFHOST_APT_OWNER": str(owner)})
    for _ in range(100):
        if owner.exists() and (tmp_path / "count").exists():
            break
        time.sleep(0.05)
    first = owner.read_text()
    owner.write_text("12345.1\n")  # what a newer run writes
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert err.strip().endswith("a newer deploy has taken over the package manager: this run "
                                "stops here")
    assert first.split(".")[0] == str(proc.pid)
    assert not (tmp_path / "log").exists()  # nothing was installed


def test_apt_install_stops_at_once_on_another_error(tmp_path: Path) -> None:
    bin_ = _fake_tools(tmp_path, busy_runs=0)
    (bin_ / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package nope' >&2\n"
                                  "exit 100\n")
    done = _apt_install(tmp_path, bin_, 60, "nope")
    assert done.returncode == 1 and done.stderr.strip() == "E: Unable to locate package nope"


def test_guarded_command_uses_the_real_guard_result(pyinfra_host: Any, tmp_path: Path) -> None:
    flag = tmp_path / "done"
    guard = f"test -f {flag}"
    kw = {"label": "make flag", "command": f"touch {flag}", "unless": guard}
    (cmd,) = commands(backend.guarded, **kw, state=read_state(Query(guards=(guard,))))
    assert sh(cmd).returncode == 0
    assert commands(backend.guarded, **kw, state=read_state(Query(guards=(guard,)))) == []
    # without a guard the command always runs (on_change commands are gated by pyinfra _if)
    assert commands(backend.guarded, label="x", command="echo hi", unless=None,
                    state=State()) == ["echo hi"]


def test_guard_is_tested_again_on_the_target_when_packages_come_first(
        pyinfra_host: Any, tmp_path: Path) -> None:
    """The state is read before the packages phase. When that phase installs something, a
    package's postinst may do a command's work itself (rkhunter records its own baseline): the
    guard is then tested again right before the command, which runs only if it still fails."""
    flag, ran = tmp_path / "done", tmp_path / "ran"
    guard = f"test -f {flag}"
    kw = {"label": "make flag", "command": f"touch {flag} {ran}", "unless": guard}
    stale = read_state(Query(guards=(guard,)))  # read before the "package" made the flag
    (cmd,) = commands(backend.guarded, **kw, state=stale, recheck=True)
    flag.touch()  # what the postinst did meanwhile
    assert sh(cmd).returncode == 0 and not ran.exists()
    flag.unlink()
    assert sh(cmd).returncode == 0 and ran.exists()
    # A failing command still fails the script.
    (bad,) = commands(backend.guarded, label="x", command="exit 3", unless="false",
                      state=State(guards={"false": False}), recheck=True)
    assert sh(bad).returncode == 3


def test_apply_plan_rechecks_guards_only_when_it_installs_packages(
        pyinfra_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = _server()
    plan = compile_server(server, Target())
    (q,), _ = _apply(plan, server, parse(Query(), []), monkeypatch, pyinfra_host)
    guarded_cmds = [s.command for s in plan.steps
                    if isinstance(s, Run) and s.command.unless and not s.command.on_change]
    for installing in (True, False):
        state = _converged(plan, q)
        state.guards = dict.fromkeys(state.guards, False)
        if installing:
            state.packages["fail2ban"] = False
        with fresh_pyinfra() as host:
            _, ops = _apply(plan, server, state, monkeypatch, host)
        script = "\n".join(c for name, _, cmds in ops for c in cmds
                           if name in ("selfhost prepare", "selfhost commands"))
        for c in guarded_cmds:
            assert c.command in script
            assert (f"if ( {c.unless}\n) >/dev/null 2>&1; then :; else" in script) is installing


@pytest.mark.parametrize(("current", "expected"), [
    (("enabled", "active"), []),
    (("static", "active"), []),
    (("alias", "active"), []),
    (("enabled", "inactive"), ["systemctl start ssh.service"]),
    (("disabled", "active"), ["systemctl enable ssh.service >/dev/null 2>&1"]),
    (("disabled", "failed"),
     ["systemctl enable ssh.service >/dev/null 2>&1 && systemctl start ssh.service"]),
    (("", ""), ["systemctl enable ssh.service >/dev/null 2>&1 && systemctl start ssh.service"]),
    (("masked", "inactive"), ["systemctl unmask ssh.service >/dev/null && systemctl enable "
                              "ssh.service >/dev/null 2>&1 && systemctl start ssh.service"]),
])
def test_unit_state(pyinfra_host: Any, current: tuple[str, str], expected: list[str]) -> None:
    assert commands(backend.unit_state, unit="ssh.service", enabled=True, running=True,
                    state=State(units={"ssh.service": current})) == expected


def test_the_units_phase_enables_units_in_one_call(pyinfra_host: Any) -> None:
    # One `systemctl enable` (one reload of systemd's configuration), then each start.
    state = State(units={"a.service": ("disabled", "inactive"), "b.timer": ("masked", ""),
                         "c.service": ("enabled", "active"), "d.service": ("enabled", "failed"),
                         "e.service": ("disabled", "active")})
    steps = [UnitState(n, True, True) for n in ("a.service", "b.timer", "c.service",
                                               "d.service", "e.service")]
    assert list(backend._phase_commands(steps, {}, state, set(), {})) == [
        "systemctl unmask b.timer >/dev/null && systemctl enable a.service b.timer e.service "
        ">/dev/null 2>&1 && systemctl start a.service && systemctl start b.timer && "
        "systemctl start d.service"]
    done = State(units=dict.fromkeys(state.units, ("enabled", "active")))
    assert list(backend._phase_commands(steps, {}, done, set(), {})) == []


def test_unit_state_not_enabled_not_running(pyinfra_host: Any) -> None:
    assert commands(backend.unit_state, unit="x.timer", enabled=False, running=False,
                    state=State(units={"x.timer": ("disabled", "inactive")})) == []


def test_reload_unit(pyinfra_host: Any) -> None:
    assert commands(backend.reload_unit, unit="ssh.service", action="reload") == [
        "systemctl reload-or-restart ssh.service"]
    assert commands(backend.reload_unit, unit="x y.service", action="restart") == [
        "systemctl restart 'x y.service'"]


# --------------------------------------------------------------------------------------------
# admin users


HASH = "$y$j9T$abc$def"
HASH_SHA1 = hashlib.sha1(f"{HASH}\n".encode()).hexdigest()


UPLOADS = "/home/deployer/.cache/selfhost-upload"
CHPASSWD = "/run/selfhost/chpasswd-alice"


def set_password(name: str, crypt_hash: str) -> list[Any]:
    """The commands that give ``name`` the password ``crypt_hash`` (as `shown` lists them)."""
    staged = f"/run/selfhost/chpasswd-{name}"
    temp = f"{UPLOADS}/{hashlib.sha1(staged.encode()).hexdigest()[:20]}"
    return [
        f"install -d -m 700 /run/selfhost && install -m 600 /dev/null {staged}",
        ("upload", staged, f"{name}:{crypt_hash}\n".encode(), temp),
        f"chpasswd -e < {staged}; rc=$?; rm -f {staged}; exit $rc",
    ]


def test_admin_user_created(pyinfra_host: Any) -> None:
    cmds = shown(list(backend.admin_user._inner(
        user="alice", groups=("sudo",), password_hash=HASH,
        state=State(users={"alice": None}, upload_dir=UPLOADS))))
    assert cmds == [
        "useradd --create-home --shell /bin/bash --user-group --groups sudo alice",
        *set_password("alice", HASH),
    ]


def test_admin_user_password_hash_is_in_no_command_line(pyinfra_host: Any) -> None:
    cmds = list(backend.admin_user._inner(user="alice", groups=(), password_hash=HASH,
                                          state=State(users={"alice": None}, upload_dir="")))
    assert "--groups" not in cmds[0]
    strings = [c for c in cmds if isinstance(c, str)]
    assert len(strings) == len(cmds) - 1 and not any(HASH in c for c in strings)
    (upload,) = [c for c in cmds if isinstance(c, FileUploadCommand)]
    assert upload.src.getvalue() == f"alice:{HASH}\n".encode()
    # The root-only staging file exists, 0600, before the upload.
    assert cmds.index(upload) == cmds.index(f"install -d -m 700 /run/selfhost && "
                                            f"install -m 600 /dev/null {CHPASSWD}") + 1


@pytest.mark.parametrize(("current", "expected"), [
    (UserState("/bin/bash", "/home/alice", ("alice", "sudo"), HASH_SHA1), []),
    (UserState("/bin/bash", "/home/alice", ("alice",), HASH_SHA1),
     ["usermod -aG sudo alice"]),
    (UserState("/bin/sh", "/home/alice", ("alice", "sudo"), HASH_SHA1),
     ["usermod --shell /bin/bash alice"]),
    (UserState("/bin/bash", "/home/alice", ("alice", "sudo"), "0" * 40),
     set_password("alice", HASH)),
])
def test_admin_user_converges(pyinfra_host: Any, current: UserState,
                              expected: list[Any]) -> None:
    assert shown(list(backend.admin_user._inner(
        user="alice", groups=("sudo",), password_hash=HASH,
        state=State(users={"alice": current}, upload_dir=UPLOADS)))) == expected


def test_admin_user_password_is_set_from_the_uploaded_file(
        pyinfra_host: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands run for real (chpasswd is a stand-in recording its input): the staged
    file is 0600 before the hash arrives, chpasswd reads it, and it is removed."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(backend, "CHPASSWD_DIR", str(run_dir))
    uploads = tmp_path / "uploads"
    uploads.mkdir(mode=0o700)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chpasswd").write_text(f"#!/bin/sh\necho \"$*\" > {tmp_path}/args\n"
                                      f"cat > {tmp_path}/input\n")
    (bin_dir / "chpasswd").chmod(0o755)
    env_path = f"PATH={bin_dir}:$PATH; export PATH; "
    prepare, upload, apply = backend.admin_user._inner(
        user="alice", groups=(), password_hash=HASH,
        state=State(users={"alice": UserState("/bin/bash", "/home/alice", ("alice",), "")},
                    upload_dir=str(uploads)))
    staged = run_dir / "chpasswd-alice"
    assert sh(prepare).returncode == 0
    assert mode_of(run_dir) == "0700" and mode_of(staged) == "0600"
    assert upload.dest == str(staged)
    fake_sudo_upload(upload)
    assert mode_of(staged) == "0600"
    res = sh(env_path + apply)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "input").read_text() == f"alice:{HASH}\n"
    assert (tmp_path / "args").read_text() == "-e\n"
    assert not staged.exists() and list(uploads.iterdir()) == []
    # A failing chpasswd fails the command, and the staged file is removed all the same.
    (bin_dir / "chpasswd").write_text("#!/bin/sh\nexit 3\n")
    assert sh(prepare).returncode == 0
    fake_sudo_upload(upload)
    assert sh(env_path + apply).returncode == 3
    assert not staged.exists()


def test_admin_user_leaves_sudo_group_when_sudo_is_revoked(pyinfra_host: Any) -> None:
    cmds = commands(backend.admin_user, user="alice", groups=(), password_hash=None,
                    state=State(users={"alice": UserState("/bin/bash", "/home/alice",
                                                          ("alice", "sudo"), "")}))
    assert any("sudo" in c and ("gpasswd -d" in c or "deluser" in c or "usermod -G" in c
                                or "usermod -rG" in c) for c in cmds), cmds


def test_admin_user_hash_comparison_matches_the_state_script(pyinfra_host: Any,
                                                             tmp_path: Path) -> None:
    """The op's sha1 of the wanted hash and the script's sha1 of the shadow field agree, so
    an unchanged password is not set again. The script runs for real, against getent/id
    stand-ins that know alice with password hash HASH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "getent").write_text(
        "#!/bin/sh\n"
        "case \"$1\" in\n"
        "  passwd) echo 'alice:x:1001:1001::/home/alice:/bin/bash' ;;\n"
        f"  shadow) echo 'alice:{HASH}:19000:0:99999:7:::' ;;\n"
        "esac\n")
    (bin_dir / "id").write_text("#!/bin/sh\necho alice sudo\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    q = Query(users=("alice",))
    res = subprocess.run(["/bin/sh", "-c", script(q)], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    state = parse(q, res.stdout.splitlines())
    assert commands(backend.admin_user, user="alice", groups=("sudo",), password_hash=HASH,
                    state=state) == []
    state.upload_dir = UPLOADS
    assert shown(commands(backend.admin_user, user="alice", groups=("sudo",),
                          password_hash="$y$j9T$new$hash", state=state)) == set_password(
        "alice", "$y$j9T$new$hash")


def test_resolve_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SELFHOST_TEST_HASH", HASH)
    assert backend._resolve_secret("secret:env:SELFHOST_TEST_HASH") == HASH
    f = tmp_path / "hash"
    f.write_text(HASH + "\n")
    assert backend._resolve_secret(f"secret:file:{f}") == HASH
    monkeypatch.delenv("SELFHOST_TEST_HASH")
    with pytest.raises(LookupError):
        backend._resolve_secret("secret:env:SELFHOST_TEST_HASH")


def test_expand_sync(tmp_path: Path) -> None:
    src = tmp_path / "site"
    (src / "css").mkdir(parents=True)
    (src / "index.html").write_text("<h1>hi</h1>")
    (src / "css" / "a.css").write_text("body{}")
    (src / "link.html").symlink_to(src / "index.html")
    files = backend._expand_sync(Sync(str(src), "/srv/www/x", "services.web"))
    assert [(f.path, f.mode) for f in files] == [("/srv/www/x/css/a.css", "0644"),
                                                  ("/srv/www/x/index.html", "0644")]
    with pytest.raises(backend.DeployError, match="does not exist"):
        backend._expand_sync(Sync(str(tmp_path / "nope"), "/srv/www/x", "services.web"))


# --------------------------------------------------------------------------------------------
# apply_plan against a real pyinfra State


def _server() -> Server:
    return Server.model_validate({
        "hostname": "nas", "domain": "home.arpa",
        "admins": [{"name": "alice", "ssh_keys": [ALICE]}],
        "services": {"web": {"sites": [{"host": "www", "source": "site"}]}},
    }).with_base_dir(ROOT / "examples")


def _apply(plan: Any, server: Server, state: State, monkeypatch: pytest.MonkeyPatch,
           host: Any) -> tuple[list[Query], list[tuple[str, bool, list[str]]]]:
    """Run apply_plan with ``state`` as the host's state; return the queries asked and, per
    op in order, (name, gated by _if, commands)."""
    queries: list[Query] = []

    def fake_get_state(q: Query) -> State:
        queries.append(q)
        return state

    monkeypatch.setattr(backend, "_get_state", fake_get_state)
    backend.apply_plan(plan, server)
    pstate = host.state
    ops = []
    for op_hash in pstate.get_op_order():
        data = pstate.get_op_data_for_host(host, op_hash)
        gated = callable(data.global_arguments.get("_if"))
        cmds = [c.get_raw_value() if isinstance(c, StringCommand) else str(c)
                for c in data.command_generator()]
        (name,) = pstate.op_meta[op_hash].names
        ops.append((name, gated, cmds))
    return queries, ops


def _converged(plan: Any, query: Query) -> State:
    """The state of a host on which this plan has already been applied."""
    files: dict[str, FileState | None] = {}
    for step in plan.steps:
        if isinstance(step, File):
            f = step.file
            files[f.path] = FileState(hashlib.sha1(f.content.encode()).hexdigest(), f.mode,
                                      f.owner, f.group)
        if isinstance(step, Sync):
            for mf in backend._expand_sync(step):
                data = (Path(step.src) / mf.path.removeprefix(step.dest + "/")).read_bytes()
                files[mf.path] = FileState(hashlib.sha1(data).hexdigest(), mf.mode,
                                           mf.owner, mf.group)
        if isinstance(step, User):
            keys = "".join(k + "\n" for k in step.ssh_keys).encode()
            files[f"/home/{step.name}/.ssh/authorized_keys"] = FileState(
                hashlib.sha1(keys).hexdigest(), "0600", step.name, step.name)
    dirs: dict[str, FileState | None] = {}
    for step in plan.steps:
        if isinstance(step, Directory):
            d = step.dir
            dirs[d.path] = FileState("-", d.mode, d.owner, d.group)
        if isinstance(step, User):
            dirs[f"/home/{step.name}/.ssh"] = FileState("-", "0700", step.name, step.name)
    users = {
        s.name: UserState("/bin/bash", f"/home/{s.name}", (s.name, *s.groups), "")
        for s in plan.steps if isinstance(s, User)
    }
    assert set(files) == set(query.files) and set(dirs) == set(query.dirs)
    return State(files=files, dirs=dirs, guards=dict.fromkeys(query.guards, True),
                 units={u: ("enabled", "active") for u in query.units},
                 packages=dict.fromkeys(query.packages, True), users=users)


def test_apply_plan_wiring(pyinfra_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = _server()
    plan = compile_server(server, Target())
    queries, ops = _apply(plan, server, parse(Query(), []), monkeypatch, pyinfra_host)

    # One batched state read, asking for everything the plan depends on.
    (q,) = queries
    assert set(plan.files()) <= set(q.files)
    assert "/srv/www/www.home.arpa/index.html" in q.files
    assert "/home/alice/.ssh/authorized_keys" in q.files
    assert "/home/alice/.ssh" in q.dirs and "/srv/www/www.home.arpa" in q.dirs
    assert set(q.units) == {s.name for s in plan.steps if isinstance(s, UnitState)}
    assert set(q.packages) == set(next(s for s in plan.steps if isinstance(s, Packages)).names)
    assert set(q.guards) == {s.command.unless for s in plan.steps
                             if isinstance(s, Run) and s.command.unless}
    assert q.users == ("alice",)

    # The same fixed sequence of phase operations on every host, whatever its plan (pyinfra
    # orders operations across hosts by call site), none gated.
    assert [name for name, _, _ in ops] == [f"selfhost {p}" for p in backend.PHASES]
    assert not any(gated for _, gated, _ in ops)
    cmds = {name.removeprefix("selfhost "): c for name, _, c in ops}
    # On a blank host every phase has work to do. Units are reloaded even though this deploy
    # starts them: installing a package may already have started it with its default config.
    assert all(cmds[p] for p in backend.PHASES if p != "removals"), cmds
    assert cmds["removals"] == []  # nothing was deployed before: nothing to remove
    reloads = "\n".join(cmds["reloads"])
    assert all(f"selfhost_job {s.unit} {'reload-or-restart' if s.action == 'reload' else 'restart'}"
               in reloads for s in plan.steps if isinstance(s, Reload))
    assert "selfhost_job fail2ban.service restart" in reloads  # a reload can drop its actions
    assert any("apt-get install" in c for c in cmds["packages"])
    files = "\n".join(cmds["files"])
    for path in plan.files():
        assert path in files
    assert "/srv/www/www.home.arpa/index.html" in files
    admins = "\n".join(cmds["admins"])
    assert "useradd" in admins and "/home/alice/.ssh/authorized_keys" in admins
    # A unit whose file changed is started by its reload (where a file that breaks it is put
    # back), not by the units phase; the others are started there.
    units = "\n".join(cmds["units"])
    assert "systemctl start ssh.service" not in units and "systemctl enable ssh.service" in units
    assert "systemctl start cron.service" in units
    # Every file changed, so every on-change command runs, after the files, all in one script.
    on_change = [s.command.command for s in plan.steps
                 if isinstance(s, Run) and s.command.on_change]
    assert on_change and all(c in "\n".join(cmds["commands"]) for c in on_change)
    assert len(cmds["prepare"]) == 1  # plain commands of a phase travel as one script


@pytest.mark.parametrize("purge", [False, True], ids=["packages-kept", "packages-purged"])
def test_a_service_removed_from_the_model_is_stopped_and_its_data_kept(
        pyinfra_host: Any, monkeypatch: pytest.MonkeyPatch, purge: bool) -> None:
    """The previous deploy's manifest (read in the batched state) lists calendars; the model
    no longer has them: their unit is stopped and disabled, their configuration removed unless
    a package owns it, the package left installed (purged only when the model says so), and
    their data untouched."""
    from selfhost.compile.removal import MANIFEST, manifest_text

    server = Server.model_validate({**_server().model_dump(mode="json", exclude_none=True),
                                    "removal": {"purge_packages": purge}}
                                   ).with_base_dir(ROOT / "examples")
    plan = compile_server(server, Target())
    old = manifest_text({"services.radicale": {
        "units": ["radicale.service"], "files": ["/etc/radicale/config"],
        "packages": ["radicale"], "data": ["/var/lib/radicale/collections"]},
        "services.web": {"units": ["caddy.service"], "files": ["/etc/caddy/Caddyfile"],
                         "packages": ["caddy"], "data": ["/var/lib/caddy"]}})
    state = parse(Query(manifest=MANIFEST), [
        "M\t0\t" + base64.b64encode(old.encode()).decode()])
    assert state.manifest == old
    _, ops = _apply(plan, server, state, monkeypatch, pyinfra_host)
    removals = "\n".join(next(c for name, _, c in ops if name == "selfhost removals"))
    assert "systemctl disable --now radicale.service" in removals
    assert "dpkg-query -S /etc/radicale/config >/dev/null 2>&1 || rm -f /etc/radicale/config" \
        in removals
    assert "caddy" not in removals  # still in the model
    assert "rm -rf /var/lib/radicale" not in removals  # data is never deleted
    assert "rm -f /var/lib/radicale" not in removals
    assert ">> /var/lib/selfhost/removed.tsv" in removals  # `selfhost check` shows it
    assert ("apt-get purge -y -qq radicale" in removals) == purge


def test_apply_plan_on_a_converged_host_sends_no_commands(pyinfra_host: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    server = _server()
    plan = compile_server(server, Target())
    (q,), _ = _apply(plan, server, parse(Query(), []), monkeypatch, pyinfra_host)
    with fresh_pyinfra() as host:  # a new pyinfra State for the second deploy
        _, ops = _apply(plan, server, _converged(plan, q), monkeypatch, host)
    busy = [(name, cmds) for name, is_gated, cmds in ops if not is_gated and cmds]
    assert busy == []


def test_apply_plan_reloads_only_what_changed(pyinfra_host: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    server = _server()
    plan = compile_server(server, Target())
    (q,), _ = _apply(plan, server, parse(Query(), []), monkeypatch, pyinfra_host)
    state = _converged(plan, q)
    old = state.files["/etc/nftables.conf"]
    assert old is not None
    state.files["/etc/nftables.conf"] = FileState("0" * 40, old.mode, old.owner, old.group)
    with fresh_pyinfra() as host:
        _, ops = _apply(plan, server, state, monkeypatch, host)
    busy = {name.removeprefix("selfhost "): cmds for name, _, cmds in ops if cmds}
    assert set(busy) == {"files", "reloads"}
    assert len(busy["files"]) == 1 and "nft -c -f" in busy["files"][0]
    # The reload is owed from before the file changes until it has run (see the next test).
    marker = "/var/lib/selfhost/pending/reload-nftables.service"
    script = busy["files"][0]
    assert f"touch {marker}" in script
    assert script.index(f"touch {marker}") < script.index("mv -f /etc/nftables.conf.selfhost-new")
    # ... and the version nftables runs with is kept until it has been reloaded with the new one.
    prev = "/var/lib/selfhost/prev/etc/nftables.conf"
    assert f"cp -p /etc/nftables.conf {prev}" in script
    assert script.index(f"cp -p /etc/nftables.conf {prev}") < script.index(
        "mv -f /etc/nftables.conf.selfhost-new")
    (reload,) = busy["reloads"]
    # (The kept versions of every file the reload depends on are dropped once it succeeded.)
    assert re.search(re.escape("if selfhost_job nftables.service reload-or-restart && "
                               f"selfhost_settled nftables.service >/dev/null; then rm -f {prev} "
                               f"{prev}.absent") + r"( \S+)* && " + re.escape(f"rm -f {marker}; else"),
                     reload), reload


def test_a_reload_owed_by_an_interrupted_deploy_is_done_by_the_next(
        pyinfra_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Killed between a file and its reload: the file is new, the service runs the old
    # configuration (a closed port still open). The next deploy sees the marker and reloads.
    server = _server()
    plan = compile_server(server, Target())
    (q,), _ = _apply(plan, server, parse(Query(), []), monkeypatch, pyinfra_host)
    assert q.pending
    state = _converged(plan, q)
    state.pending = {"reload-nftables.service", "reload-caddy.service"}
    with fresh_pyinfra() as host:
        _, ops = _apply(plan, server, state, monkeypatch, host)
    busy = {name.removeprefix("selfhost "): cmds for name, _, cmds in ops if cmds}
    assert set(busy) == {"reloads"} and len(busy["reloads"]) == 1, busy  # one script
    for unit in ("caddy.service", "nftables.service"):
        assert (f"if selfhost_job {unit} reload-or-restart && selfhost_settled {unit} >/dev/null; "
                "then rm -f ") in busy["reloads"][0]
        assert f"&& rm -f /var/lib/selfhost/pending/reload-{unit}; else" in busy["reloads"][0]
    # On-change commands are owed the same way.
    on_change = [s for s in plan.steps if isinstance(s, Run) and s.command.on_change]
    assert on_change
    if on_change:
        state.pending = {backend._marker(on_change[0])}
        with fresh_pyinfra() as host:
            _, ops = _apply(plan, server, state, monkeypatch, host)
        sent = [c for _, _, cmds in ops for c in cmds]
        assert any(on_change[0].command.command in c and "rm -f /var/lib/selfhost/pending/run-"
                   in c for c in sent), sent


def test_a_target_that_cannot_do_what_the_model_asks_stops_before_any_operation(
        pyinfra_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = _server()
    plan = compile_server(server, Target())
    (q,), _ = _apply(plan, server, parse(Query(), []), monkeypatch, pyinfra_host)
    assert q.prechecks and "/etc/caddy/Caddyfile" in q.space and "/var/lib/dpkg" in q.space
    blank = parse(q, [])
    roomy = {p: Space(10**7, 10**6, "/") for p in q.space}

    def ops_with(state: State) -> list[Any]:
        with fresh_pyinfra() as host:
            return _apply(plan, server, state, monkeypatch, host)[1]

    # No CAP_NET_ADMIN: one line with both ways out, and not a single operation.
    state = dataclasses.replace(blank, prechecks=Prechecks(net_admin=False), space=roomy)
    with pytest.raises(backend.DeployError) as info:
        ops_with(state)
    msg = str(info.value)
    assert "\n" not in msg and "CAP_NET_ADMIN" in msg and "--cap-add NET_ADMIN" in msg
    assert "firewall: {enabled: false, reason:" in msg and msg.endswith("Nothing was changed")
    # ...fine when the model turns the firewall off (with a reason).
    off = server.model_copy(update={"hardening": server.hardening.model_copy(update={
        "firewall": FirewallHardening(enabled=False, reason="the host filters")})})
    off_plan = compile_server(off, Target())
    assert "/etc/nftables.conf" not in off_plan.files()
    assert backend.target_problems(off_plan, state, {}) == []
    # nft installed but not working (capability present, nf_tables missing...)
    state = dataclasses.replace(blank, prechecks=Prechecks(net_admin=True, nft_works=False),
                                space=roomy)
    with pytest.raises(backend.DeployError, match="`nft list tables` fails here"):
        ops_with(state)

    # A full file system: named, with how much is needed, before anything is written.
    full = dict(roomy)
    for path in q.space:
        if path.startswith("/srv/"):
            full[path] = Space(3, 1000, "/srv")
    state = dataclasses.replace(blank, prechecks=Prechecks(net_admin=True), space=full)
    with pytest.raises(backend.DeployError) as info:
        ops_with(state)
    msg = str(info.value)
    assert "(mounted on /srv) is full: 3 KiB free, this deploy needs about" in msg, msg
    assert msg.endswith("Nothing was changed") and "\n" not in msg
    # Out of inodes
    full = {p: Space(10**7, 5 if p.startswith("/srv/") else 10**6, "/srv" if p.startswith(
        "/srv/") else "/") for p in q.space}
    state = dataclasses.replace(blank, prechecks=Prechecks(net_admin=True), space=full)
    with pytest.raises(backend.DeployError, match=r"mounted on /srv\) has no free inodes left"):
        ops_with(state)
    # Packages to install need room where dpkg unpacks.
    low = {p: Space(1024 if p in backend.PACKAGE_PATHS else 10**7, None, "/usr"
                    if p in backend.PACKAGE_PATHS else "/") for p in q.space}
    state = dataclasses.replace(blank, prechecks=Prechecks(net_admin=True), space=low)
    with pytest.raises(backend.DeployError, match=r"mounted on /usr\) is full: 1024 KiB free"):
        ops_with(state)
    # ...but a converged host writing nothing is never refused for space.
    converged = _converged(plan, q)
    converged.space = {p: Space(0, 0, "/") for p in q.space}
    converged.prechecks = Prechecks(net_admin=True, nft_works=True)
    files = {s.file.path: s.file.content.encode() for s in plan.steps if isinstance(s, File)}
    for step in plan.steps:
        if isinstance(step, Sync):
            for mf in backend._expand_sync(step):
                files[mf.path] = (Path(step.src) / mf.path.removeprefix(step.dest + "/")
                                  ).read_bytes()
    assert backend.target_problems(plan, converged, files) == []
    converged.files["/etc/caddy/Caddyfile"] = None  # ...and one that does is
    assert "is full: 0 KiB free" in backend.target_problems(plan, converged, files)[0]


def test_busy_or_interrupted_dpkg_is_announced(pyinfra_host: Any, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    server = _server()
    plan = compile_server(server, Target())
    (q,), _ = _apply(plan, server, parse(Query(), []), monkeypatch, pyinfra_host)
    state = _converged(plan, q)
    state.prechecks = Prechecks(dpkg_interrupted=True, apt_busy="", net_admin=True)
    caplog.clear()
    with fresh_pyinfra() as host:
        _, ops = _apply(plan, server, state, monkeypatch, host)
    busy = {name.removeprefix("selfhost "): cmds for name, _, cmds in ops if cmds}
    assert busy == {"packages": [backend.apt_install_cmd([])]}  # recovery only
    assert "dpkg was interrupted" in caplog.text and "dpkg --configure -a" in caplog.text
    state.prechecks = Prechecks(apt_busy="unattended-upgr (pid 42)", net_admin=True)
    caplog.clear()
    with fresh_pyinfra() as host:
        _apply(plan, server, state, monkeypatch, host)
    assert ("the package manager is busy (held by unattended-upgr (pid 42)): the deploy waits "
            "for it, up to 10 minutes") in caplog.text


def test_joined_phase_script_stops_at_the_first_failure(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = backend._join(["true", "if false; then :; else exit 1; fi", f"touch {marker}"])
    assert sh(script).returncode != 0
    assert not marker.exists()
    assert sh(backend._join(["export X=1; true", f"touch {marker}"])).returncode == 0
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# apply_plan with an admin password read from a secret reference

PW_VAR = "SELFHOST_TEST_ALICE_PASSWORD"
STRONG = "Xk9#mQ2vL7pR4wZt8nBy"


def _password_server(monkeypatch: pytest.MonkeyPatch) -> Server:
    """alice with `password: {env: PW_VAR}`, validated while the variable is unset."""
    monkeypatch.delenv(PW_VAR, raising=False)
    return Server.model_validate({
        "hostname": "nas", "domain": "home.arpa",
        "admins": [{"name": "alice", "ssh_keys": [ALICE], "password": {"env": PW_VAR}}],
    })


def _op_commands(host: Any) -> dict[str, list[Any]]:
    """Per phase, the commands as objects (uploads included)."""
    pstate = host.state
    out = {}
    for op_hash in pstate.get_op_order():
        (name,) = pstate.op_meta[op_hash].names
        data = pstate.get_op_data_for_host(host, op_hash)
        out[name.removeprefix("selfhost ")] = list(data.command_generator())
    return out


def _with_password(plan: Any, query: Query, crypt_hash: str | None) -> State:
    state = _converged(plan, query)
    user = state.users["alice"]
    assert user is not None
    if crypt_hash is not None:
        from selfhost.models.passwords import shadow_sha1

        user.shadow_sha1 = shadow_sha1(crypt_hash)
        state.settings["alice"] = crypt_hash.rsplit("$", 1)[0]
    state.upload_dir = UPLOADS
    return state


@pytest.mark.parametrize("value", ["password1234567", "alicealicealice12", "Zq8#xL2w"])
def test_apply_plan_refuses_a_weak_password_before_any_operation(
        pyinfra_host: Any, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    server = _password_server(monkeypatch)
    plan = compile_server(server, Target())
    monkeypatch.setenv(PW_VAR, value)  # set only now: the deploy must check it itself
    with pytest.raises(backend.DeployError) as info:
        _apply(plan, server, State(), monkeypatch, pyinfra_host)
    message = str(info.value)
    assert "too weak" in message and f"env:{PW_VAR}" in message
    assert value not in message
    assert pyinfra_host.state.get_op_order() == []  # nothing was queued, let alone sent


def test_apply_plan_refuses_an_unreadable_password(pyinfra_host: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    server = _password_server(monkeypatch)
    with pytest.raises(backend.DeployError, match=f"cannot read the password .env:{PW_VAR}"):
        _apply(compile_server(server, Target()), server, State(), monkeypatch, pyinfra_host)
    assert pyinfra_host.state.get_op_order() == []


def test_apply_plan_unchanged_password_sends_nothing(pyinfra_host: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ctypes")
    from selfhost.models.passwords import hash_password

    server = _password_server(monkeypatch)
    plan = compile_server(server, Target())
    monkeypatch.setenv(PW_VAR, STRONG)
    current = hash_password(STRONG)  # what the first deploy set, with its own salt
    with fresh_pyinfra() as host:
        (q,), _ = _apply(plan, server, _with_password(plan, _query(plan, server, monkeypatch),
                                                      current), monkeypatch, host)
        assert q.upload_dir and q.users == ("alice",)
        assert _op_commands(host)["admins"] == []


def _query(plan: Any, server: Server, monkeypatch: pytest.MonkeyPatch) -> Query:
    """The batched query apply_plan asks for this plan."""
    with fresh_pyinfra() as host:
        state = State(upload_dir=UPLOADS)
        (q,), _ = _apply(plan, server, state, monkeypatch, host)
    return q


def test_apply_plan_changed_password_uploads_a_new_hash(pyinfra_host: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from selfhost.models.passwords import crypt, hash_password

    server = _password_server(monkeypatch)
    plan = compile_server(server, Target())
    monkeypatch.setenv(PW_VAR, STRONG)
    old = hash_password("An-Older#Passphrase-2023")
    state = _with_password(plan, _query(plan, server, monkeypatch), old)
    with fresh_pyinfra() as host:
        _apply(plan, server, state, monkeypatch, host)
        cmds = _op_commands(host)
    admins = cmds["admins"]
    uploads = [c for c in admins if isinstance(c, FileUploadCommand)]
    (upload,) = uploads
    line = upload.src.getvalue().decode()
    name, new_hash = line.rstrip("\n").split(":", 1)
    assert name == "alice" and new_hash.startswith("$y$") and new_hash != old
    assert crypt(STRONG, new_hash) == new_hash  # the new hash is of the password
    assert upload.dest == CHPASSWD
    assert upload.remote_temp_filename.startswith(UPLOADS + "/")
    texts = [c.get_raw_value() for phase in cmds.values() for c in phase
             if isinstance(c, StringCommand)]
    assert any(f"chpasswd -e < {CHPASSWD}" in t for t in texts)
    for t in texts:
        assert STRONG not in t and new_hash not in t
    assert all(STRONG.encode() not in c.src.getvalue()
               for phase in cmds.values() for c in phase if isinstance(c, FileUploadCommand))


def test_apply_plan_new_admin_gets_a_hashed_password(pyinfra_host: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    server = _password_server(monkeypatch)
    plan = compile_server(server, Target())
    monkeypatch.setenv(PW_VAR, STRONG)
    _apply(plan, server, State(users={"alice": None}, upload_dir=""), monkeypatch, pyinfra_host)
    admins = _op_commands(pyinfra_host)["admins"]
    assert "useradd" in admins[0].get_raw_value()
    (upload,) = [c for c in admins if isinstance(c, FileUploadCommand)]
    assert upload.src.getvalue().startswith(b"alice:$y$")


def test_apply_plan_without_libxcrypt_says_to_use_password_hash(
        pyinfra_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfhost.models import passwords

    def missing() -> Any:
        raise passwords.CryptUnavailable("libcrypt was not found")

    monkeypatch.setattr(passwords, "_libcrypt", missing)
    server = _password_server(monkeypatch)
    plan = compile_server(server, Target())
    monkeypatch.setenv(PW_VAR, STRONG)
    with pytest.raises(backend.DeployError, match="give `password_hash` instead"):
        _apply(plan, server, State(upload_dir=""), monkeypatch, pyinfra_host)
    assert pyinfra_host.state.get_op_order() == []


def test_apply_plan_needs_the_private_upload_directory(pyinfra_host: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    server = _password_server(monkeypatch)
    plan = compile_server(server, Target())
    monkeypatch.setenv(PW_VAR, STRONG)
    with pytest.raises(backend.DeployError, match="private upload directory"):
        _apply(plan, server, State(), monkeypatch, pyinfra_host)  # upload_dir: None
    assert pyinfra_host.state.get_op_order() == []


def test_apply_plan_refuses_a_hash_reference_that_is_no_hash(
        pyinfra_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server.model_validate({
        "hostname": "nas", "domain": "home.arpa",
        "admins": [{"name": "alice", "ssh_keys": [ALICE],
                    "password_hash": {"env": "SELFHOST_TEST_ALICE_HASH"}}]})
    monkeypatch.setenv("SELFHOST_TEST_ALICE_HASH", "hunter2-plaintext")
    with pytest.raises(backend.DeployError, match="not a strong crypt hash") as info:
        _apply(compile_server(server, Target()), server, State(upload_dir=""), monkeypatch,
               pyinfra_host)
    assert "hunter2" not in str(info.value)
    monkeypatch.setenv("SELFHOST_TEST_ALICE_HASH", HASH)
    _apply(compile_server(server, Target()), server, State(users={"alice": None}, upload_dir=""),
           monkeypatch, pyinfra_host)
    uploads = [c for c in _op_commands(pyinfra_host)["admins"]
               if isinstance(c, FileUploadCommand)]
    assert [u.src.getvalue() for u in uploads] == [f"alice:{HASH}\n".encode()]


def test_a_unit_still_starting_is_read_once_it_settles(tmp_path: Path) -> None:
    """Right after a deploy restarted it, a unit may be "activating": the state script waits
    for it to settle instead of reporting it inactive (which would start it again and break
    the next deploy's idempotence under load)."""
    count = tmp_path / "count"
    fake = tmp_path / "systemctl"
    fake.write_text("#!/bin/sh\n"
                    f"n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}\n"
                    'case $1 in is-enabled) echo enabled;; is-active) '
                    '[ "$n" -ge 3 ] && echo active || echo activating;; esac\n')
    fake.chmod(0o755)
    q = Query(units=("fail2ban.service",))
    res = subprocess.run(["sh", "-c", script(q)], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
                         timeout=30)
    assert parse(q, res.stdout.splitlines()).units["fail2ban.service"] == ("enabled", "active")


def test_a_fleet_file_is_loaded_and_routed_once_per_run(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """pyinfra runs the deploy once per host: the fleet is read, validated and routed once
    (else a fleet's deploy costs the square of its size on the controller)."""
    import selfhost.config

    calls: list[str] = []
    real = selfhost.config.load_fleet

    def counting(path: Any) -> Any:
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(selfhost.config, "load_fleet", counting)
    model = tmp_path / "fleet.yaml"
    model.write_text((ROOT / "examples" / "backup.yaml").read_text())
    first = backend._load_prepared(model)
    second = backend._load_prepared(str(model))
    assert first is second and len(calls) == 1
    model.write_text(model.read_text() + "\n# edited\n")  # a changed file is read again
    backend._load_prepared(model)
    assert len(calls) == 2


def test_apt_install_without_packages_waits_for_a_busy_dpkg(tmp_path: Path) -> None:
    # Nothing to install, an apt left running by a killed deploy: wait for dpkg's lock, since
    # the commands that follow use dpkg and debconf (seen in the faults scenario).
    bin_ = _fake_tools(tmp_path, busy_runs=0)
    (bin_ / "dpkg").write_text(
        "#!/bin/sh\n"
        f"n=$(cat {tmp_path}/dcount 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/dcount\n"
        "if [ \"$n\" -lt 1 ]; then echo 'dpkg: error: dpkg frontend lock was locked by "
        "<unknown> process with pid 435' >&2; exit 2; fi\n"
        f'echo "dpkg $*" >> {tmp_path}/log\n')
    (bin_ / "dpkg").chmod(0o755)
    done = _apt_install(tmp_path, bin_, 60)
    assert done.returncode == 0, done.stderr
    assert "the package manager is busy" in done.stderr
    assert (tmp_path / "log").read_text().splitlines() == [
        "dpkg --force-confdef --force-confold --configure -a"]


def test_the_sudo_password_never_reaches_a_command_line(tmp_path: Path) -> None:
    """pyinfra's own way puts ``PYINFRA_SUDO_PASSWORD=<password>`` in the login shell's command
    line on the target (the ``ssh`` scenario's sampler caught it in /proc). private_sudo()
    makes the askpass helper hold the password instead: the commands pyinfra builds for sudo
    (with pyinfra's real command builder) carry a fixed word, and the uploaded helper, run by
    a real shell, prints the exact password."""
    from pyinfra.api.deploy import deploy
    from pyinfra.connectors.ssh import SSHConnector
    from pyinfra.connectors.util import make_unix_command_for_host

    password = "it's a \"long\" $HOME pass`word` \\ with spaces"
    inventory = Inventory((["nas.example.org"], {"_sudo": True, "_sudo_password": password}))
    state = PyinfraState(inventory, Config())
    target = inventory.get_host("nas.example.org")
    assert isinstance(target.connector, SSHConnector)
    sent: list[str] = []
    uploads: dict[str, bytes] = {}

    def run_shell_command(command: StringCommand, **kwargs: Any) -> tuple[bool, Any]:
        raw = command.get_raw_value()
        sent.append(raw)
        res = subprocess.run(["/bin/sh", "-c", raw], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)})
        lines = res.stdout.splitlines()
        return res.returncode == 0, type("Out", (), {"stdout_lines": lines,
                                                      "stderr": res.stderr})()

    def put_file(data: Any, path: str, **kwargs: Any) -> bool:
        uploads[path] = data.read()
        Path(path).write_bytes(uploads[path])
        return True

    target.run_shell_command = run_shell_command  # type: ignore[method-assign]
    target.put_file = put_file  # type: ignore[method-assign]
    with ctx_state.use(state), ctx_inventory.use(inventory), ctx_config.use(state.config), \
            ctx_host.use(target):
        backend.private_sudo()
        backend.private_sudo()  # once per host: the second call finds the token
        (path,) = uploads
        assert Path(path).parent == tmp_path and Path(path).name.startswith("selfhost-askpass-")
        assert oct(Path(path).stat().st_mode & 0o777) == "0o700"
        assert target.data._sudo_password == backend.ASKPASS_TOKEN
        seen: list[Any] = []

        @deploy("probe")
        def probe() -> None:  # what a deploy's operations and facts are given
            seen.append(target.current_deploy_kwargs["_sudo_password"])
        probe()
        assert seen == [backend.ASKPASS_TOKEN]
        cmd = make_unix_command_for_host(state, target, StringCommand("true"), _sudo=True,
                                         _sudo_password=seen[0])
    raw = cmd.get_raw_value()
    assert f"SUDO_ASKPASS={path}" in raw and "sudo -H -A -k" in raw, raw
    assert password not in raw and password not in "".join(sent)
    assert len(sent) == 1  # no pyinfra helper made: its cache holds ours
    out = subprocess.run([path], capture_output=True, text=True, check=True)
    assert out.stdout == password + "\n"


def test_private_sudo_leaves_other_connectors_and_passwordless_sudo_alone() -> None:
    with fresh_pyinfra() as local:
        local.data._sudo = True
        local.data._sudo_password = "x"
        backend.private_sudo()
        assert local.data._sudo_password == "x"
    inventory = Inventory((["nas.example.org"], {"_sudo": True}))
    state = PyinfraState(inventory, Config())
    target = inventory.get_host("nas.example.org")
    with ctx_state.use(state), ctx_inventory.use(inventory), ctx_config.use(state.config), \
            ctx_host.use(target):
        backend.private_sudo()  # would fail: not connected
        assert target.data.get("_sudo_password") is None


# --------------------------------------------------------------------------------------------
# Rollback: a file that passes its validator but makes its unit fail after the reload is put
# back (issue 15). The commands run for real with /bin/sh; `systemctl` and `journalctl` are
# stand-ins that "load" the configuration file: one containing BAD fails (like Caddy binding a
# port already in use), and the unit is then failed.

FAKE_SYSTEMCTL = """#!/bin/sh
s="$FAKE_STATE"
case "$1" in
  reload-or-restart|restart)
    echo "$1 $2 $(cat "$FAKE_CONF" 2>/dev/null || echo '<none>')" >> "$s/calls"
    if grep -q BAD "$FAKE_CONF" 2>/dev/null && [ "${FAKE_WEDGE:-0}" = 1 ] \
        && [ "$1" = reload-or-restart ]; then
      # Caddy 2.6: the reload fails, the service never says READY=1, systemd waits.
      echo reloading > "$s/state"
      echo "caddy.service: Reload operation timed out. Killing reload process." >> "$s/journal"
      exec sleep 60
    fi
    if grep -q BAD "$FAKE_CONF" 2>/dev/null; then
      echo failed > "$s/state"
      echo "Error: loading new config: listen tcp :8443: bind: address already in use" \\
        >> "$s/journal"
      [ "${FAKE_EXIT_OK:-0}" = 1 ] && exit 0
      exit 1
    fi
    echo active > "$s/state"; exit 0;;
  is-active) cat "$s/state"; [ "$(cat "$s/state")" = active ];;
  show) case "$3" in ActiveState) cat "$s/state";; ControlPID) echo 0;; esac;;
esac
exit 0
"""
FAKE_JOURNALCTL = '#!/bin/sh\necho "journalctl $*" >> "$FAKE_STATE/calls"\ncat "$FAKE_STATE/journal"\n'


@dataclasses.dataclass
class Box:
    """A target in tmp_path: a managed file ``conf``, the prev and pending directories."""

    root: Path
    conf: Path
    prev: Path
    pending: Path
    env: dict[str, str]

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                              timeout=30, env=self.env)

    def deploy(self, content: bytes, action: str = "reload", mode: str = "0640",
               unit: str = "web.service", staged: bool = False,
               ) -> subprocess.CompletedProcess[str]:
        """What a deploy sends for a changed file that calls for a reload: the pending
        marker and the kept version, the file (validated, moved into place), the reload."""
        path = str(self.conf)
        files = [f"mkdir -p {self.pending} && touch {self.pending}/reload-web.service && "
                 + backend.keep_prev_cmd(path, str(self.prev)),
                 backend._install_file_cmd(path, content, mode, ME, MY_GROUP, "true {path}"),
                 ]
        res = self.run(backend._join(files))
        assert res.returncode == 0, res.stderr
        if staged:  # the restart, then its window shared with the phase's other restarts
            args = (unit, action, (path,), f"reload-{unit}", (path,), str(self.prev),
                    str(self.pending))
            return self.run(backend._join([
                backend.reload_with_rollback(*args, stage="restart"),
                f"sleep {backend.RESTART_WINDOW}",
                backend.reload_with_rollback(*args, stage="window")]))
        return self.run(backend._join([backend.reload_with_rollback(
            unit, action, (path,), f"reload-{unit}", (path,),
            prev_dir=str(self.prev), pending_dir=str(self.pending))]))

    def calls(self) -> list[str]:
        f = self.root / "state" / "calls"
        return f.read_text().splitlines() if f.exists() else []


@pytest.fixture
def box(tmp_path: Path) -> Box:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("systemctl", FAKE_SYSTEMCTL), ("journalctl", FAKE_JOURNALCTL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "state").write_text("active\n")
    (state / "journal").write_text("")
    conf = tmp_path / "etc" / "web" / "Caddyfile"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "FAKE_STATE": str(state),
           "FAKE_CONF": str(conf)}
    return Box(tmp_path, conf, tmp_path / "prev", tmp_path / "pending", env)


def test_a_reload_that_works_forgets_the_previous_version(box: Box) -> None:
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("site v1\n")
    res = box.deploy(b"site v2\n")
    assert res.returncode == 0, res.stderr
    assert box.conf.read_text() == "site v2\n"
    assert box.calls() == ["reload-or-restart web.service site v2"]
    assert not (box.pending / "reload-web.service").exists()
    assert not [p for p in box.prev.rglob("*") if p.is_file()]  # nothing kept any more
    assert mode_of(box.prev) == "0700"


@pytest.mark.parametrize("action", ["reload", "restart"])
def test_a_file_that_validates_but_breaks_its_unit_is_put_back(box: Box, action: str) -> None:
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("site v1\n")
    box.conf.chmod(0o640)
    res = box.deploy(b"site v2 BAD\n", action=action)
    assert res.returncode == 1
    # The previous version is back, same mode, and the unit was reloaded again with it.
    assert box.conf.read_text() == "site v1\n" and mode_of(box.conf) == "0640"
    verb = "reload-or-restart" if action == "reload" else "restart"
    assert box.calls()[0] == f"{verb} web.service site v2 BAD"
    assert box.calls()[1] == f"{verb} web.service site v1"
    assert box.calls()[2].startswith("journalctl -u web.service --since @")
    assert (box.root / "state" / "state").read_text() == "active\n"
    # One message naming the unit, the file, what was done, then the journal's lines.
    lines = res.stderr.splitlines()
    done = "reloaded" if action == "reload" else "restarted"
    assert lines[0] == (
        f"selfhost: web.service failed after its {action} with the new {box.conf}: the "
        f"previous version of {box.conf} was put back and web.service {done} again (now "
        "active); the deploy stops here. The journal of web.service says:")
    assert lines[1] == ("selfhost:   Error: loading new config: listen tcp :8443: bind: "
                        "address already in use")
    # The reload stays owed: the next deploy replaces the file again and retries.
    assert (box.pending / "reload-web.service").exists()
    assert not [p for p in box.prev.rglob("*") if p.is_file()]
    assert not list(box.conf.parent.glob("*.selfhost-new"))


def test_a_unit_that_is_not_active_after_a_successful_restart_is_rolled_back(
        box: Box) -> None:
    # `systemctl restart` of a simple service returns 0 before the service reads its
    # configuration and exits: the unit's state after the window is what counts.
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("site v1\n")
    box.env["FAKE_EXIT_OK"] = "1"
    res = box.deploy(b"BAD\n", action="restart")
    assert res.returncode == 1
    assert box.conf.read_text() == "site v1\n"
    assert "web.service failed after its restart" in res.stderr


@pytest.mark.parametrize("exit_ok", ["0", "1"])
def test_a_restart_checked_in_the_shared_window_is_rolled_back(box: Box, exit_ok: str) -> None:
    # The phase's restarts share one window: each unit is restarted (rolled back at once
    # when the restart fails), then, after one sleep, each must still be active.
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("site v1\n")
    box.env["FAKE_EXIT_OK"] = exit_ok
    res = box.deploy(b"BAD\n", action="restart", staged=True)
    assert res.returncode == 1
    assert box.conf.read_text() == "site v1\n"
    assert "web.service failed after its restart" in res.stderr
    assert "address already in use" in res.stderr
    assert (box.pending / "reload-web.service").exists()  # still owed
    assert not [p for p in box.prev.rglob("*") if p.is_file()]


def test_a_restart_that_lasts_the_shared_window_forgets_the_previous_version(
        box: Box) -> None:
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("site v1\n")
    res = box.deploy(b"site v2\n", action="restart", staged=True)
    assert res.returncode == 0, res.stderr
    assert box.conf.read_text() == "site v2\n"
    assert box.calls() == ["restart web.service site v2"]
    assert not (box.pending / "reload-web.service").exists()
    assert not [p for p in box.prev.rglob("*") if p.is_file()]


def test_the_restarts_of_a_phase_share_one_window(pyinfra_host: Any) -> None:
    steps = [Reload("a.service", ("/etc/a",), "restart"), Reload("n.service", ("/etc/n",)),
             Reload("b.service", ("/etc/b",), "restart")]
    cmds = list(backend._phase_commands(steps, {}, State(), {"/etc/a", "/etc/n", "/etc/b"},
                                        backend.owed_by_file(steps)))
    assert len(cmds) == 6
    # No wait after each restart: one for all, then each unit is checked.
    assert ("if selfhost_job a.service restart && selfhost_settled a.service >/dev/null; "
            "then date +%s") in cmds[0]
    assert "selfhost_job n.service reload-or-restart &&" in cmds[1]
    assert cmds[3] == "sleep 1"
    assert "if wedged=0; selfhost_settled a.service >/dev/null; then rm -f" in cmds[4]
    assert "rm -f /var/lib/selfhost/pending/reload-a.service" in cmds[4]
    assert "rm -f /var/lib/selfhost/pending/reload-a.service" not in cmds[0]


def test_a_new_file_that_breaks_its_unit_is_removed(box: Box) -> None:
    res = box.deploy(b"BAD\n")
    assert res.returncode == 1
    assert not box.conf.exists()
    assert f"the previous version of {box.conf}(removed) was put back" in res.stderr
    assert not [p for p in box.prev.rglob("*") if p.is_file()]


def test_the_version_kept_by_an_interrupted_deploy_is_the_one_put_back(box: Box) -> None:
    # A deploy killed after it replaced the file, before the reload: the unit still runs v1,
    # the kept version is v1 and the reload is owed. The next deploy brings v3, which breaks
    # the unit: v1 (what the unit ran) is put back, not v2 (never loaded).
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("site v1\n")
    keep = backend.keep_prev_cmd(str(box.conf), str(box.prev))
    assert box.run(keep).returncode == 0
    box.conf.write_text("site v2\n")
    kept = backend.prev_path(str(box.conf), str(box.prev))
    assert Path(kept).read_text() == "site v1\n"
    assert box.run(keep).returncode == 0  # a second deploy keeps what is already kept
    assert Path(kept).read_text() == "site v1\n"
    res = box.deploy(b"site v3 BAD\n")
    assert res.returncode == 1
    assert box.conf.read_text() == "site v1\n"


def test_a_unit_still_failing_with_the_previous_version_is_reported(box: Box) -> None:
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("site v1 BAD\n")
    res = box.deploy(b"site v2 BAD\n")
    assert res.returncode == 1
    assert box.conf.read_text() == "site v1 BAD\n"
    assert "web.service reloaded again (now failed)" in res.stderr
    assert (box.pending / "reload-web.service").exists()


def test_without_a_kept_version_the_failure_is_still_reported(box: Box) -> None:
    # A deploy killed after the marker, before the copy; the file is new and broken.
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("BAD\n")
    res = box.run(backend.reload_with_rollback(
        "web.service", "reload", (str(box.conf),), "reload-web.service", (str(box.conf),),
        prev_dir=str(box.prev), pending_dir=str(box.pending)))
    assert res.returncode == 1
    assert ("selfhost: web.service failed after its reload with the new "
            f"{box.conf}: no previous version was kept to put back (web.service is failed)"
            ) in res.stderr


def test_a_file_shared_by_two_units_is_kept_until_the_last_one_is_reloaded(
        pyinfra_host: Any) -> None:
    a = Reload("a.service", ("/etc/shared", "/etc/a"))
    b = Reload("b.service", ("/etc/shared",))
    steps = [a, b]
    cmds = list(backend._phase_commands(steps, {}, State(), {"/etc/shared", "/etc/a"},
                                        backend.owed_by_file(steps)))
    assert len(cmds) == 2
    assert isinstance(cmds[0], str) and isinstance(cmds[1], str)
    ok_a = re.findall(r">/dev/null; then (.*?); else", cmds[0])[0]
    assert ok_a == ("rm -f /var/lib/selfhost/prev/etc/a /var/lib/selfhost/prev/etc/a.absent "
                    "&& rm -f /var/lib/selfhost/pending/reload-a.service")
    assert "rm -f /var/lib/selfhost/prev/etc/shared " in cmds[1]


def test_a_unit_stuck_reloading_is_restarted_with_the_previous_version(box: Box) -> None:
    # Caddy 2.6 (Debian 12 and 13) says RELOADING=1 and never READY=1 when its new
    # configuration fails to load: `systemctl reload` then waits forever (caddyserver/caddy
    # #7385). The wait ends after 3 s; a restart with the previous file unwedges the unit.
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("site v1\n")
    box.env["FAKE_WEDGE"] = "1"
    res = box.deploy(b"site v2 BAD\n")
    assert res.returncode == 1
    assert box.conf.read_text() == "site v1\n"
    assert [c for c in box.calls() if not c.startswith("journalctl")] == [
        "reload-or-restart web.service site v2 BAD", "restart web.service site v1"]
    assert ("web.service restarted (it was stuck reloading) (now active)"
            in res.stderr), res.stderr
    assert "selfhost:   caddy.service: Reload operation timed out." in res.stderr


def test_sshd_is_never_restarted_even_to_bring_it_back(box: Box) -> None:
    box.conf.parent.mkdir(parents=True)
    box.conf.write_text("Port 22 BAD\n")
    box.env["FAKE_WEDGE"] = "1"
    res = box.deploy(b"Port 22 BAD too\n", unit="ssh.service")
    assert res.returncode == 1
    assert box.conf.read_text() == "Port 22 BAD\n"
    assert not [c for c in box.calls() if c.startswith("restart")], box.calls()
    assert "ssh.service reloaded again (now reloading)" in res.stderr


def test_a_unit_file_put_back_is_read_again_before_the_unit(box: Box) -> None:
    unit_file = "/etc/systemd/system/x.timer"
    script = backend.reload_with_rollback("x.timer", "restart", (unit_file,), "reload-x.timer",
                                          (unit_file,))
    assert "case \"$back\" in *' /etc/systemd/'*) systemctl daemon-reload;; esac" in script
    assert script.index("daemon-reload") > script.index(f"mv -f {unit_file}.selfhost-new")
    assert script.index("daemon-reload") < script.rindex("selfhost_job x.timer restart")
    assert "daemon-reload" not in backend.reload_with_rollback(
        "web.service", "reload", (str(box.conf),), "reload-web.service", ())


def test_a_missing_secret_of_a_file_is_a_clear_deploy_error(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    # Seen in the bench: a backup password from an unset environment variable ended the
    # deploy with a Python traceback.
    from selfhost.compose.resources import ManagedFile
    from selfhost.models.base import SecretRef

    monkeypatch.delenv("SELFHOST_TEST_UNSET_SECRET", raising=False)
    f = ManagedFile("/etc/selfhost/backup/usb.password", "", mode="0600",
                    secret=SecretRef(env="SELFHOST_TEST_UNSET_SECRET"))
    with pytest.raises(backend.DeployError) as exc:
        backend._file_content(f, backend.DirKeyStore(tmp_path))
    assert str(exc.value) == (
        "/etc/selfhost/backup/usb.password: cannot read the secret "
        "(env:SELFHOST_TEST_UNSET_SECRET): secret environment variable "
        "SELFHOST_TEST_UNSET_SECRET is not set; nothing was changed")


def test_the_sftp_channel_is_closed_after_the_askpass_upload() -> None:
    # pyinfra memoizes its SFTP client for the whole run: one of the two sessions that
    # selfhost's sshd allows per connection (MaxSessions 2) would stay taken.
    from pyinfra.api.util import memoize

    closed: list[str] = []

    class Client:
        def close(self) -> None:
            closed.append("sftp")

    class Connector:
        @memoize
        def get_file_transfer_connection(self) -> Client:
            return Client()

    c = Connector()
    first = c.get_file_transfer_connection()
    assert c.get_file_transfer_connection() is first  # memoized, as in pyinfra
    backend.close_file_transfer(c)
    assert closed == ["sftp"]
    assert c.get_file_transfer_connection() is not first  # a new one when needed
    backend.close_file_transfer(object())  # another connector: nothing to do


@pytest.mark.parametrize("status", [0, 3])
def test_early_commands_run_while_packages_install_and_are_waited_for(
        tmp_path: Path, status: int) -> None:
    # Command.during_packages: in the background of the apt command, which it does not slow
    # down nor change the status of; the command returns only once they are done.
    done = tmp_path / "early"
    script = backend.with_early(f"sleep 0.2; echo apt; exit {status}",
                                [f"sleep 1; echo bg; touch {done}", "exit 1"])
    res = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert res.returncode == status
    assert res.stdout == "apt\n"  # the early commands' output is discarded
    assert done.exists()
    assert backend.with_early("apt", []) == "apt"


def test_the_early_part_of_a_command_starts_only_with_packages_to_install(
        pyinfra_host: Any) -> None:
    from selfhost.hardening.ssh import HOST_KEYS_CMD

    early = [HOST_KEYS_CMD.during_packages or ""]
    step = Packages(("openssh-server",))
    missing = State(packages={"openssh-server": False})
    [cmd] = backend._phase_commands([step], {}, missing, set(), {}, early)
    assert isinstance(cmd, str) and early[0] in cmd and "apt-get install" in cmd
    assert cmd.index(early[0]) < cmd.index("apt-get install")
    present = State(packages={"openssh-server": True})
    assert list(backend._phase_commands([step], {}, present, set(), {}, early)) == []


def test_the_host_keys_command_takes_the_early_key_only_when_complete(tmp_path: Path) -> None:
    # The RSA key made while packages installed is taken when the pair matches and is 4096
    # bits; a cut or mismatched one is discarded and a new key is made in place.
    from selfhost.hardening import ssh

    if not shutil.which("ssh-keygen"):
        pytest.skip("no ssh-keygen")
    etc = tmp_path / "ssh"
    etc.mkdir()

    def local(text: str) -> str:
        return text.replace("/etc/ssh", str(etc))

    early = local(ssh.RSA_EARLY)
    assert subprocess.run(["/bin/sh", "-c", local(ssh.HOST_KEYS_CMD.during_packages or "")],
                          timeout=120).returncode == 0
    made = Path(early + ".pub").read_text()
    assert subprocess.run(["/bin/sh", "-c", local(ssh.HOST_KEYS_CMD.command)],
                          timeout=120).returncode == 0
    assert (etc / "ssh_host_rsa_key.pub").read_text() == made
    assert not Path(early).exists() and not Path(early + ".pub").exists()
    assert subprocess.run(["/bin/sh", "-c", local(ssh.HOST_KEYS_CMD.unless or "")]).returncode == 0
    # A cut one (its private half empty): not taken.
    for f in etc.glob("ssh_host_rsa_key*"):
        f.unlink()
    Path(early).write_text("")
    Path(early + ".pub").write_text(made)
    assert subprocess.run(["/bin/sh", "-c", local(ssh.HOST_KEYS_CMD.command)],
                          timeout=120).returncode == 0
    assert (etc / "ssh_host_rsa_key.pub").read_text() != made
    assert subprocess.run(["/bin/sh", "-c", local(ssh.HOST_KEYS_CMD.unless or "")]).returncode == 0
    assert not Path(early).exists()


def test_units_enabled_by_their_package_are_not_enabled_again(tmp_path: Path) -> None:
    # After installing packages the state read is stale: only the units still not enabled
    # (by the same test as unit_changes) are passed to one `systemctl enable`.
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "systemctl").write_text(
        "#!/bin/sh\ncase $1 in is-enabled) case $2 in a.service) echo enabled;; "
        "b.service) echo disabled;; c.service) echo static;; d.service) echo indirect;; "
        "esac;; *) echo \"$*\" >> " + str(tmp_path / "calls") + ";; esac\n")
    (bin_ / "systemctl").chmod(0o755)
    units = [(n, True, False) for n in ("a.service", "b.service", "c.service", "d.service")]
    [cmd] = list(backend.units_state(units, State(), recheck=True))
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}
    assert subprocess.run(["/bin/sh", "-c", cmd], env=env, timeout=30).returncode == 0
    assert (tmp_path / "calls").read_text() == "enable b.service d.service\n"
    (tmp_path / "calls").unlink()
    done = [(n, True, False) for n in ("a.service", "c.service")]
    [cmd] = list(backend.units_state(done, State(), recheck=True))
    assert subprocess.run(["/bin/sh", "-c", cmd], env=env, timeout=30).returncode == 0
    assert not (tmp_path / "calls").exists()


def test_a_guarded_command_s_package_joins_the_one_apt_run(pyinfra_host: Any) -> None:
    step = Packages(("openssh-server",))
    missing = State(packages={"openssh-server": False})
    [cmd] = backend._phase_commands([step], {}, missing, set(), {}, [], ["systemd-timesyncd"])
    assert isinstance(cmd, str)
    assert cmd.endswith(f"{backend.LOCK_TIMEOUT} openssh-server systemd-timesyncd")
    present = State(packages={"openssh-server": True})
    assert list(backend._phase_commands([step], {}, present, set(), {}, [],
                                        ["systemd-timesyncd"])) == []
