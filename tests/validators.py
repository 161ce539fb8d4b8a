"""Run rendered files' own checks (``validate`` commands) inside a Debian container of the
plan's release, as the backend runs them on a server.

A plan's checks run on the target after its packages phase: ``sshd -t`` of that release's
OpenSSH (Debian 12 refuses Debian 13's ``mlkem768x25519-sha256``), ``visudo``, ``nft -c``,
``caddy validate``, ``fail2ban-client -t`` with Debian's ``/etc/fail2ban``, ``apt-config``...
The host running the unit tests has none of that, or other versions. So each check runs in a
container of ``localhost/selfhost-validators:<release>-<recipe>`` (``images/build-validators``: the
test image of that release with the plans' packages installed, cached by recipe hash), booted
with systemd like a server (``/run/sshd`` exists because ssh.service runs), with no network.

A missing podman, image or validator is a test failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
FIXTURE_DIR = ROOT / "tests" / "fixtures" / "compile"
PREFIX = "h16-validators"
"""Container names: ``<PREFIX>-<release>-<pid>`` (unique per test session)."""

# Every validator's package, whatever the fixtures' plans hold (a plan without a web site has
# no caddy, but the checks of broken files below still need it).
VALIDATOR_PACKAGES = ("caddy", "fail2ban", "nftables", "openssh-server", "sudo", "apt",
                      "perl-base", "systemd", "bind9-utils")


class ValidatorError(Exception):
    """The container for a release could not be prepared (message says why)."""


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
"""The example models: the unit tests check their files on every release."""


def plan_packages(release: str) -> list[str]:
    """The packages of every compile fixture's plan for ``release`` and of every example's,
    plus every validator's."""
    import update_fixtures as updater  # tests/ is on sys.path (rootdir conftest)

    from selfhost.compile import compile_server
    from selfhost.compile.plan import Packages

    names = set(VALIDATOR_PACKAGES)
    for path in sorted(FIXTURE_DIR.glob("*.json")):
        inp = json.loads(path.read_text(encoding="utf-8"))["input"]
        target = updater.target_of(inp)
        if target.release != release:
            continue
        plan = compile_server(updater.load_model(inp), target)
        for step in plan.steps:
            if isinstance(step, Packages):
                names.update(step.names)
    for example in EXAMPLES:
        for plan in updater.example_plans(example, release):
            for step in plan.steps:
                if isinstance(step, Packages):
                    names.update(step.names)
    return sorted(names)


def _run(argv: list[str], timeout: float,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def _remove_orphans() -> None:
    """Remove containers of test sessions that died without cleaning up (their pid is gone)."""
    listed = _run(["podman", "ps", "--all", "--filter", "label=selfhost.test=validators",
                   "--format", "{{.Names}}"], timeout=60)
    for name in listed.stdout.split():
        pid = name.rsplit("-", 1)[-1]
        if name.startswith(PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _run(["podman", "rm", "--force", "--time", "0", "--ignore", name], timeout=60)


class Validators:
    """One booted container per release, started on first use and removed by ``close``."""

    def __init__(self) -> None:
        self.containers: dict[str, str] = {}
        self.images: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.errors: dict[str, ValidatorError] = {}

    def container(self, release: str) -> str:
        if release in self.containers:
            return self.containers[release]
        if release in self.errors:  # do not try again for every test
            raise self.errors[release]
        try:
            return self._start(release)
        except ValidatorError as e:
            self.errors[release] = e
            raise

    def _start(self, release: str) -> str:
        if shutil.which("podman") is None:
            raise ValidatorError(
                "podman is not installed: rendered files are checked by their own validators "
                "in a Debian container of the plan's release (run scripts/setup)")
        t0 = time.monotonic()
        build = _run([str(IMAGES / "build-validators"), release, *plan_packages(release)],
                     timeout=1200)
        if build.returncode != 0:
            raise ValidatorError(f"images/build-validators {release} failed:\n"
                                 f"{build.stdout[-3000:]}{build.stderr[-3000:]}")
        image = build.stdout.strip().splitlines()[-1]
        self.images[release] = image
        _remove_orphans()
        name = f"{PREFIX}-{release}-{os.getpid()}"
        env = {**os.environ, "CONTAINERS_CONF": str(IMAGES / "containers.conf")}
        _run(["podman", "rm", "--force", "--time", "0", "--ignore", name], timeout=60)
        # The options of molecule/default/create.yml (runc and lowered rlimits come from
        # images/containers.conf), without any network: the checks need none.
        start = _run(["podman", "run", "--detach", f"--name={name}", "--hostname=nas",
                      "--cap-add=NET_ADMIN", "--cap-add=NET_RAW", "--systemd=always",
                      "--network=none", "--label=selfhost.test=validators", image,
                      # Samba's nmbd waits 90 s for a network that --network=none never
                      # gives, and boot (below) waits for it: masked (plans turn it off).
                      "/sbin/init", "systemd.mask=nmbd.service"], timeout=120, env=env)
        if start.returncode != 0:
            raise ValidatorError(f"cannot start {image}: {start.stderr}")
        self.containers[release] = name
        boot = ""
        for _ in range(60):
            res = _run(["podman", "exec", name, "systemctl", "is-system-running", "--wait"],
                       timeout=180)
            boot = res.stdout.strip()
            if boot in ("running", "degraded"):
                break
            time.sleep(1)
        else:
            raise ValidatorError(f"{name}: systemd did not finish booting ({boot!r})")
        self.timings[release] = time.monotonic() - t0
        return name

    def run(self, release: str, script: str,
            stdin: str | bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """``sh -c script`` as root in the release's container."""
        name = self.container(release)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        return subprocess.run(["podman", "exec", "-i", name, "/bin/sh", "-c", script],
                              input=data or b"", capture_output=True, timeout=120)

    def check(self, release: str, path: str, content: str | bytes,
              validate: str) -> subprocess.CompletedProcess[bytes]:
        """Stage ``content`` next to ``path`` as the backend does (``PATH.selfhost-new``),
        run ``validate`` on it, remove it. The live file is never touched."""
        tmp = shlex.quote(f"{path}.selfhost-new")
        check = validate.replace("{path}", tmp)
        script = (f"mkdir -p {shlex.quote(str(Path(path).parent))} && cat > {tmp} && "
                  f"( {check} ); rc=$?; rm -f {tmp}; exit $rc")
        res = self.run(release, script, content)
        if res.returncode == 127:
            raise ValidatorError(
                f"{path}: the validator of `{validate}` is missing in "
                f"{self.images.get(release)}: add its package to "
                "VALIDATOR_PACKAGES in tests/validators.py\n" + res.stderr.decode())
        return res

    def install(self, release: str, path: str, content: str | bytes,
                mode: str = "0644") -> None:
        """Put a file that passed its check in place, as the deploy does before it checks the
        next files of the plan (fail2ban's jail.local reads the filters written before it)."""
        q = shlex.quote
        res = self.run(release, f"mkdir -p {q(str(Path(path).parent))} && cat > {q(path)} && "
                       f"chmod {mode} {q(path)}", content)
        assert res.returncode == 0, res.stderr

    def prepare(self, release: str, plan: object) -> None:
        """What the deploy puts in place before a plan's files are checked, beyond packages:
        a certificate for each certificate the plan uses (the mail module's placeholder
        command makes one before its files), and the files that a checked file reads and
        that the plan writes before it (OpenDKIM's tables; Postfix's main.cf and master.cf,
        each read by the other's check), and the system users it adds."""
        for h in getattr(plan, "health", []):
            if h.kind != "certificate":
                continue
            d = shlex.quote(f"/etc/selfhost/tls/{h.target}")
            res = self.run(release, f"mkdir -p {d} && cd {d} && {{ test -s privkey.pem || "
                           "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test "
                           "-keyout privkey.pem -out fullchain.pem 2>/dev/null; }")
            if res.returncode != 0:
                raise ValidatorError(f"cannot make a test certificate: {res.stderr!r}")
        # The accounts the deploy makes before the files: system users by the plan's own
        # commands (PHP-FPM pools name them), admins by name (nftables names them: a local
        # port only its user may open).
        for step in getattr(plan, "steps", []):
            command = getattr(step, "command", None)
            if type(step).__name__ == "Run" and command.name.startswith("system user "):
                res = self.run(release, command.command)
                if res.returncode != 0:
                    raise ValidatorError(f"cannot add a system user: {res.stderr!r}")
            elif type(step).__name__ == "User":
                u = shlex.quote(step.name)
                res = self.run(release, f"id -u {u} >/dev/null 2>&1 || useradd --system {u}")
                if res.returncode != 0:
                    raise ValidatorError(f"cannot add the account {step.name}: {res.stderr!r}")
        for path, text in plan.files().items():  # type: ignore[attr-defined]
            if path.startswith("/etc/opendkim/") or path in ("/etc/postfix/main.cf",
                                                             "/etc/postfix/master.cf"):
                self.install(release, path, text)

    def close(self) -> None:
        for name in self.containers.values():
            _run(["podman", "rm", "--force", "--time", "0", "--ignore", name], timeout=60)
        self.containers.clear()
