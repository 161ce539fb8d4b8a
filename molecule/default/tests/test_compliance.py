"""The rules of an independent compliance benchmark for Debian 12 (ComplianceAsCode's
ANSSI-BP-028 content, as `oscap` reads them) that selfhost applies, checked on the REAL
deployed system, Debian 12 and 13 — and on an untouched container of the same image, where
every one of them must fail (a check that cannot fail proves nothing).

Each check reads the system the way an auditor or the program concerned does (sudo's own
`sudo -V`, PAM through libpam, libcrypt, the files auditors read), not selfhost's plan. The
rules selfhost does not apply are departures: each must be listed with its reason in the plan
of the deployed model, and the system must be in the state that reason describes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import testinfra

from selfhost.compile.compiler import compile_server
from selfhost.compile.target import Target
from selfhost.config import load_server

REPO = Path(__file__).resolve().parents[3]
PROBE = "selfhost-rules"
PROBE_PASSWORD = "Kestrel-orbit-lantern-4417"
PAM_SERVICE = "/etc/pam.d/selfhost-rules-probe"


def _active(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _file(host: Any, path: str) -> str:
    f = host.file(path)
    return str(f.content_string) if f.exists else ""


def _conf(host: Any, path: str) -> dict[str, str]:
    """key = value lines of a pwquality/faillock style file (bare flags map to "")."""
    out = {}
    for ln in _active(_file(host, path)):
        key, _, value = ln.partition("=")
        out[key.strip()] = value.strip()
    return out


# --- sudo ----------------------------------------------------------------------------------

def sudoers_d_mode(host: Any) -> list[str]:
    """/etc/sudoers.d: 0750 or stricter, owned by root."""
    d = host.file("/etc/sudoers.d")
    if not d.is_directory:
        return ["/etc/sudoers.d is missing"]
    if d.user != "root" or d.mode & 0o7027:
        return [f"/etc/sudoers.d is {oct(d.mode)} {d.user}"]
    return []


def _sudo_defaults(host: Any) -> str:
    res = host.run("sudo -V")
    return str(res.stdout) if res.rc == 0 else ""


def sudo_ignore_dot(host: Any) -> list[str]:
    """sudo ignores `.` in PATH (sudo's own report of the defaults it parsed)."""
    return [] if "Ignore '.' in $PATH" in _sudo_defaults(host) else ["ignore_dot is off"]


def sudo_umask(host: Any) -> list[str]:
    """A command run through sudo gets umask 0027 even from a 022 shell."""
    res = host.run("umask 022; sudo -n sh -c umask")
    got = res.stdout.strip() if res.rc == 0 else f"sudo failed: {res.stderr.strip()}"
    return [] if got == "0027" else [f"umask under sudo: {got}"]


# --- PAM -----------------------------------------------------------------------------------

def _stack(host: Any, name: str) -> list[str]:
    return [re.sub(r"\s+", " ", ln) for ln in _active(_file(host, f"/etc/pam.d/{name}"))]


def faillock_stack(host: Any) -> list[str]:
    """pam_faillock's four lines in the order its manual gives (what auditors match)."""
    auth = _stack(host, "common-auth")
    want = [r"auth required pam_faillock\.so preauth", r"auth (\[[^]]*\]|\S+) pam_unix\.so",
            r"auth \[default=die\] pam_faillock\.so authfail",
            r"auth sufficient pam_faillock\.so authsucc"]
    pos = []
    for pattern in want:
        hits = [i for i, ln in enumerate(auth) if re.match(pattern, ln)]
        if not hits:
            return [f"common-auth has no line {pattern!r}"]
        pos.append(hits[0])
    problems = [] if pos == sorted(pos) else [f"common-auth order: {auth}"]
    if "account required pam_faillock.so" not in _stack(host, "common-account"):
        problems.append("common-account lacks pam_faillock")
    return problems


def _faillock_value(host: Any, key: str) -> int | None:
    """The value pam_faillock uses: an argument in common-auth, else faillock.conf."""
    for ln in _stack(host, "common-auth"):
        m = re.search(rf"pam_faillock\.so .*\b{key}=(\d+)", ln)
        if m:
            return int(m.group(1))
    value = _conf(host, "/etc/security/faillock.conf").get(key)
    return int(value) if value and value.isdigit() else None


def faillock_deny(host: Any) -> list[str]:
    problems = faillock_stack(host)
    deny = _faillock_value(host, "deny")
    if deny is None or not 1 <= deny <= 3:
        problems.append(f"deny = {deny}")
    return problems


def faillock_interval(host: Any) -> list[str]:
    problems = faillock_stack(host)
    interval = _faillock_value(host, "fail_interval")
    if interval is None or interval < 900:
        problems.append(f"fail_interval = {interval}")
    return problems


def faillock_unlock_time(host: Any) -> list[str]:
    problems = faillock_stack(host)
    unlock = _faillock_value(host, "unlock_time")
    if unlock is None or unlock < 900:  # 0 (never unlocks by itself) is a lockout
        problems.append(f"unlock_time = {unlock}")
    return problems


def pwhistory(host: Any) -> list[str]:
    """pam_pwhistory remembers at least 5 passwords, before pam_unix in common-password."""
    pw = _stack(host, "common-password")
    hist = [i for i, ln in enumerate(pw) if re.match(r"password (requisite|required) "
                                                     r"pam_pwhistory\.so .*remember=(\d+)", ln)]
    unix = [i for i, ln in enumerate(pw) if " pam_unix.so" in ln]
    if not hist or not unix or hist[0] > unix[0]:
        return [f"no pam_pwhistory before pam_unix: {pw}"]
    remember = int(re.search(r"remember=(\d+)", pw[hist[0]]).group(1))  # type: ignore[union-attr]
    return [] if remember >= 5 else [f"remember={remember}"]


def pwquality_minlen(host: Any) -> list[str]:
    """minlen >= 15 in /etc/security/pwquality.conf itself, pam_pwquality in the stack."""
    problems = []
    if not any(" pam_pwquality.so" in ln for ln in _stack(host, "common-password")):
        problems.append("pam_pwquality is not in common-password")
    minlen = _conf(host, "/etc/security/pwquality.conf").get("minlen", "")
    if not minlen.isdigit() or int(minlen) < 15:
        problems.append(f"pwquality.conf minlen = {minlen!r}")
    return problems


def pwquality_single_source(host: Any) -> list[str]:
    """No pwquality.conf.d drop-in overrides the keys auditors read in pwquality.conf."""
    res = host.run("grep -lsE '^[[:space:]]*[a-z_]+' /etc/security/pwquality.conf.d/*")
    return [f"drop-ins: {res.stdout.split()}"] if res.stdout.strip() else []


def _hash_params(hashed: str) -> str:
    return hashed.split("$")[2] if hashed.startswith("$y$") else hashed[:8]


GENSALT = ("import ctypes,sys; l=ctypes.CDLL('libcrypt.so.1'); l.crypt_gensalt.restype="
           "ctypes.c_char_p; print(l.crypt_gensalt(b'$y$', int(sys.argv[1]), None, 0).decode())")


def pam_hash_rounds(host: Any) -> list[str]:
    """pam_unix in common-password names its `rounds`, and a password set through PAM is
    hashed with the yescrypt cost login.defs gives (one cost for every tool)."""
    problems = []
    line = next((ln for ln in _stack(host, "common-password") if " pam_unix.so" in ln), "")
    rounds = re.search(r"\brounds=(\d+)", line)
    if not rounds:
        problems.append(f"pam_unix has no rounds=: {line!r}")
    m = re.search(r"^YESCRYPT_COST_FACTOR\s+(\d+)", _file(host, "/etc/login.defs"), re.M)
    if not m:
        return [*problems, "login.defs sets no YESCRYPT_COST_FACTOR"]
    cost = int(m.group(1))
    if cost < 8 or (rounds and int(rounds.group(1)) != cost):
        problems.append(f"login.defs cost {cost}, pam_unix rounds {rounds and rounds.group(1)}")
    want = host.check_output(f"python3 -c {shlex.quote(GENSALT)} {cost}").split("$")[2]
    with ProbeUser(host):
        res = host.run(f"echo {PROBE}:{PROBE_PASSWORD}-h | chpasswd")
        hashed = host.check_output(f"getent shadow {PROBE} | cut -d: -f2")
    if res.rc != 0 or _hash_params(hashed) != want:
        problems.append(f"chpasswd (PAM) hashed with {_hash_params(hashed)}, "
                        f"login.defs cost {cost} is {want} ({res.stderr.strip()})")
    return problems


def user_init_files(host: Any) -> list[str]:
    """Shell start-up files in /etc/skel and in login homes: no group write/execute, nothing
    for others (0740 at most), including those of a user made now with useradd."""
    with ProbeUser(host):
        out = host.run(
            "{ echo /etc/skel; getent passwd | awk -F: '$3 >= 1000 && $3 < 65534 {print $6}'; }"
            " | while read -r d; do test -d \"$d\" && find \"$d\" -maxdepth 1 -type f "
            "-regextype egrep -regex '.*/\\.(profile|bash(rc|_profile|_login|_logout)|"
            "z(shenv|profile|shrc|login|logout)|t?cshrc|login|logout|kshrc|mkshrc)' "
            "-perm /7037; done").stdout.split()
        if not host.file(f"/home/{PROBE}/.bashrc").exists:
            out.append(f"/home/{PROBE}/.bashrc is missing")
    return [f"{len(out)} files: {out[:5]}"] if out else []


RULES: dict[str, Callable[[Any], list[str]]] = {
    "directory_permissions_etc_sudoersd": sudoers_d_mode,
    "sudo_add_ignore_dot": sudo_ignore_dot,
    "sudo_add_umask": sudo_umask,
    "accounts_password_pam_unix_remember": pwhistory,
    "accounts_passwords_pam_faillock_deny": faillock_deny,
    "accounts_passwords_pam_faillock_interval": faillock_interval,
    "accounts_passwords_pam_faillock_unlock_time": faillock_unlock_time,
    "accounts_password_pam_minlen": pwquality_minlen,
    "accounts_password_pam_unix_rounds": pam_hash_rounds,
    "file_permission_user_init_files": user_init_files,
}


class ProbeUser:
    """A throw-away login made with useradd, its password history cleared on both ends."""

    def __init__(self, host: Any) -> None:
        self.host = host

    def _clear(self) -> None:
        self.host.run(f"userdel -r {PROBE} 2>/dev/null; faillock --user {PROBE} --reset; "
                      f"sed -i '/^{PROBE}:/d' /etc/security/opasswd 2>/dev/null")

    def __enter__(self) -> None:
        self._clear()
        self.host.check_output(f"useradd --create-home --shell /bin/bash {PROBE}")

    def __exit__(self, *exc: object) -> None:
        self._clear()


@pytest.mark.parametrize("rule", RULES)
def test_rule_holds_on_the_deployed_system(host: Any, rule: str) -> None:
    assert RULES[rule](host) == []


def test_pwquality_has_one_source(host: Any) -> None:
    assert pwquality_single_source(host) == []


# --- behaviour behind the PAM rules ----------------------------------------------------------

PAM_AUTH = r"""
import ctypes, sys
pam, libc = ctypes.CDLL("libpam.so.0"), ctypes.CDLL("libc.so.6")
libc.calloc.restype = libc.strdup.restype = ctypes.c_void_p
class Msg(ctypes.Structure): _fields_ = [("style", ctypes.c_int), ("msg", ctypes.c_char_p)]
class Resp(ctypes.Structure): _fields_ = [("resp", ctypes.c_void_p), ("code", ctypes.c_int)]
CONV = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.POINTER(Msg)),
                        ctypes.POINTER(ctypes.POINTER(Resp)), ctypes.c_void_p)
class Conv(ctypes.Structure): _fields_ = [("conv", CONV), ("data", ctypes.c_void_p)]
NODELAY = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)(lambda *a: None)
service, user = sys.argv[1].encode(), sys.argv[2].encode()
for password in sys.argv[3:]:
    def answer(n, msgs, resp, _):
        arr = ctypes.cast(libc.calloc(n, ctypes.sizeof(Resp)), ctypes.POINTER(Resp))
        for i in range(n):
            arr[i].resp = libc.strdup(password.encode())
        resp[0] = arr
        return 0
    conv, handle = Conv(CONV(answer), None), ctypes.c_void_p()
    pam.pam_start(service, user, ctypes.byref(conv), ctypes.byref(handle))
    pam.pam_set_item(handle, 10, NODELAY)  # PAM_FAIL_DELAY: no 2 s wait per failure
    rc = pam.pam_authenticate(handle, 0)
    if rc == 0:
        rc = pam.pam_acct_mgmt(handle, 0)
    pam.pam_end(handle, rc)
    print(rc)
"""


def _authenticate(host: Any, *passwords: str) -> list[int]:
    """pam_authenticate + pam_acct_mgmt through common-auth/common-account, one per password
    (0 = success)."""
    args = " ".join(shlex.quote(p) for p in passwords)
    out = host.check_output(f"python3 -c {shlex.quote(PAM_AUTH)} "
                            f"{PAM_SERVICE.rsplit('/', 1)[1]} {PROBE} {args}")
    return [int(x) for x in out.split()]


def _tally(host: Any) -> int:
    """Valid failure records pam_faillock holds for the probe user."""
    out = host.check_output(f"faillock --user {PROBE}")
    return len(re.findall(r"^\d{4}-\d\d-\d\d .* V$", out, re.M))


def test_three_wrong_passwords_lock_an_account_and_a_success_clears_the_count(
        host: Any) -> None:
    host.check_output(f"printf '@include common-auth\\n@include common-account\\n' > {PAM_SERVICE}")
    try:
        with ProbeUser(host):
            host.check_output(f"usermod -p \"$(python3 -c {shlex.quote(HASH)} "
                              f"{shlex.quote(PROBE_PASSWORD)})\" {PROBE}")
            good, bad = PROBE_PASSWORD, "wrong-" + PROBE_PASSWORD
            # Two failures then a success: authsucc/account clear the counter.
            assert _authenticate(host, bad, bad, good)[2] == 0
            assert _tally(host) == 0
            # Three failures: even the right password is refused until unlock_time.
            res = _authenticate(host, bad, bad, bad, good)
            assert all(rc != 0 for rc in res), res
            assert _tally(host) == 3
            host.check_output(f"faillock --user {PROBE} --reset")
            assert _authenticate(host, good) == [0]
    finally:
        host.run(f"rm -f {PAM_SERVICE}")


HASH = ("import ctypes,sys; l=ctypes.CDLL('libcrypt.so.1'); "
        "l.crypt_gensalt.restype=l.crypt.restype=ctypes.c_char_p; "
        "print(l.crypt(sys.argv[1].encode(), l.crypt_gensalt(b'$y$', 5, None, 0)).decode())")


def test_a_recent_password_cannot_be_reused(host: Any) -> None:
    with ProbeUser(host):
        first, second = PROBE_PASSWORD + "-a", PROBE_PASSWORD + "-b"
        for pw in (first, second):
            host.check_output(f"echo {PROBE}:{shlex.quote(pw)} | chpasswd")
        res = host.run(f"echo {PROBE}:{shlex.quote(first)} | chpasswd")
        assert res.rc != 0 and "already used" in res.stderr, res.stderr


def test_fifteen_characters_are_the_minimum(host: Any) -> None:
    with ProbeUser(host):
        assert host.run(f"echo {PROBE}:Kestrel-orbit4 | chpasswd").rc != 0
        assert host.run(f"echo {PROBE}:Kestrel-orbit45 | chpasswd").rc == 0


# --- departures: off, with the reason in the plan, and the system as the reason says -------

def _plan_departures(release: str) -> dict[str, str]:
    plan = compile_server(load_server(REPO / "examples" / "home.yaml"),
                          Target(release, in_container=True))
    return dict(plan.disabled_controls)


def requiretty_off(host: Any) -> list[str]:
    """sudo runs without a terminal (how a deploy over SSH calls it)."""
    res = host.run("su alice -s /bin/sh -c 'sudo -n true' </dev/null")
    return [] if res.rc == 0 else [f"sudo without a tty: {res.stderr.strip()}"]


def noexec_off(host: Any) -> list[str]:
    """A program run through sudo can start others (sh -c, apt running dpkg)."""
    res = host.run("su alice -s /bin/sh -c \"sudo -n sh -c 'id -u'\" </dev/null")
    return [] if res.stdout.strip() == "0" else [f"sudo sh -c: {res.stderr.strip()}"]


def full_admin_rules(host: Any) -> list[str]:
    """The admin's rule is full root, as the departure says."""
    out = host.run("sudo -l -U alice").stdout
    return [] if re.search(r"\(ALL : ALL\) NOPASSWD: ALL", out) else [out]


def composition_rules_off(host: Any) -> list[str]:
    """Length and dictionary, 3 classes out of 4, no per-class credits."""
    conf = _conf(host, "/etc/security/pwquality.conf")
    want = {"minclass": "3", "dcredit": "0", "ucredit": "0", "lcredit": "0", "ocredit": "0",
            "dictcheck": "1"}
    got = {k: conf.get(k) for k in want}
    return [] if got == want else [str(got)]


def root_password_not_aged(host: Any) -> list[str]:
    """root's locked password has no age limit, so root's cron jobs keep running."""
    fields = host.check_output("getent shadow root").split(":")
    return [] if fields[4] in ("", "99999") else [f"root max age {fields[4]}"]


def hash_cost_below_eleven(host: Any) -> list[str]:
    line = next((ln for ln in _stack(host, "common-password") if " pam_unix.so" in ln), "")
    m = re.search(r"rounds=(\d+)", line)
    return [] if m and 5 <= int(m.group(1)) < 11 else [line]


DEPARTURES: dict[str, tuple[str, Callable[[Any], list[str]]]] = {
    "sudo_add_requiretty": ("accounts.sudo.requiretty", requiretty_off),
    "sudo_add_noexec": ("accounts.sudo.noexec", noexec_off),
    "sudoers_explicit_command_args": ("accounts.sudo.restricted_rules", full_admin_rules),
    "sudoers_no_root_target": ("accounts.sudo.restricted_rules", full_admin_rules),
    "accounts_password_pam_dcredit": ("accounts.password_composition", composition_rules_off),
    "accounts_password_pam_lcredit": ("accounts.password_composition", composition_rules_off),
    "accounts_password_pam_ucredit": ("accounts.password_composition", composition_rules_off),
    "accounts_password_pam_ocredit": ("accounts.password_composition", composition_rules_off),
    "accounts_password_pam_minclass": ("accounts.password_composition", composition_rules_off),
    "accounts_password_set_max_life_root": ("accounts.root_password_max_age",
                                            root_password_not_aged),
    "accounts_password_pam_unix_rounds (ANSSI: 11)": ("accounts.password_hash_cost",
                                                       hash_cost_below_eleven),
}


@pytest.mark.parametrize("rule", DEPARTURES)
def test_departure_is_in_the_plan_and_the_system_matches_its_reason(
        host: Any, release: str, rule: str) -> None:
    setting, check = DEPARTURES[rule]
    reason = _plan_departures(release).get(setting, "")
    assert len(reason) > 80, f"{setting} is not listed with a reason in the plan"
    assert check(host) == []


# --- the untouched image fails every rule ---------------------------------------------------

@pytest.fixture(scope="module")
def untouched(host: Any, release: str) -> Any:
    """A container of the same image, started the way create.yml starts the scenario's and
    named after the deployed one."""
    name = f"{host.backend.name}-untouched"
    env = {**os.environ, "CONTAINERS_CONF": str(REPO / "images" / "containers.conf")}
    subprocess.run(["podman", "rm", "--force", "--time", "0", "--ignore", name],
                   check=True, capture_output=True)
    subprocess.run(["podman", "run", "--detach", f"--name={name}", "--hostname=nas",
                    "--cap-add=NET_ADMIN", "--cap-add=NET_RAW", "--systemd=always",
                    f"localhost/selfhost-debian:{release}", "/sbin/init"],
                   check=True, capture_output=True, env=env)
    try:
        for _ in range(60):
            state = subprocess.run(["podman", "exec", name, "systemctl", "is-system-running"],
                                   capture_output=True, text=True, check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(1)
        yield testinfra.get_host(f"podman://{name}")
    finally:
        subprocess.run(["podman", "rm", "--force", "--time", "0", "--ignore", name],
                       check=False, capture_output=True)


def test_every_rule_fails_on_the_untouched_image(untouched: Any) -> None:
    passing = [rule for rule, check in RULES.items() if not check(untouched)]
    assert passing == []
    # The lockout and reuse behaviour are absent there too.
    assert not any(" pam_faillock.so" in ln for ln in _stack(untouched, "common-auth"))
    assert not any(" pam_pwhistory.so" in ln for ln in _stack(untouched, "common-password"))
