"""Admin passwords given as secret references: the strength check, the model rules, the plan,
yescrypt hashing with libxcrypt, and the state script's view of current hashes (their setting
only, never the hash)."""

from __future__ import annotations

import copy
import json
import os
import random
import string
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from selfhost.compile import Target, compile_server
from selfhost.compile.plan import User
from selfhost.models import passwords
from selfhost.models.passwords import (
    MIN_LENGTH,
    WeakPassword,
    check_password,
    crypt,
    gensalt,
    hash_for,
    hash_password,
    password_problems,
    shadow_sha1,
)
from selfhost.state import UPLOAD_DIR, Query, parse, script
from selfhost.system import SUDOERS
from selfhost.validation import ModelError, validated

INVALID = (ValidationError, ModelError)

ALICE = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P "
         "alice@laptop")
VAR = "SELFHOST_TEST_PASSWORD"
# "A random 20-character password", reproducible: seeded, from letters, digits and symbols.
_RNG = random.Random(20)
STRONG = "".join(_RNG.choice(string.ascii_letters + string.digits + "#%&*+-=?@")
                 for _ in range(20))
WEAK = ["password1234567", "alicealicealice12", "Zq8#xL2w"]
NAMES = {"login": "alice", "hostname": "nas", "domain": "home.arpa"}

try:
    gensalt()
    HAVE_XCRYPT = True
except passwords.CryptUnavailable:
    HAVE_XCRYPT = False
needs_xcrypt = pytest.mark.skipif(not HAVE_XCRYPT, reason="libxcrypt with yescrypt missing")


def model(**admin: Any) -> dict[str, Any]:
    return copy.deepcopy({
        "hostname": "nas", "domain": "home.arpa",
        "admins": [{"name": "alice", "ssh_keys": [ALICE], **admin}],
    })


def fragments(secret: str, size: int = 4) -> set[str]:
    return {secret[i:i + size] for i in range(len(secret) - size + 1)}


# --------------------------------------------------------------------------- strength


def test_random_password_is_strong() -> None:
    assert len(STRONG) == 20
    assert password_problems(STRONG, **NAMES) == []
    check_password(STRONG, **NAMES)  # does not raise


@pytest.mark.parametrize("weak", WEAK)
def test_weak_passwords_are_refused_with_reasons(weak: str) -> None:
    with pytest.raises(WeakPassword) as info:
        check_password(weak, **NAMES)
    message = str(info.value)
    assert message.startswith("the password is too weak: ")
    assert weak not in message
    assert "zxcvbn rates it" in message  # zxcvbn's warning and suggestions follow


def test_reasons() -> None:
    assert password_problems("alicealicealice12", **NAMES)[0] == "it contains the login name"
    short = password_problems("Zq8#xL2w", **NAMES)
    assert short[0] == f"it is shorter than {MIN_LENGTH} characters"
    common = password_problems("password1234567", **NAMES)
    assert common == ["it is too easy to guess (zxcvbn rates it 1/4, 4 is required: This is "
                      "similar to a commonly used password. Add another word or two. Uncommon "
                      "words are better.)"]


@pytest.mark.parametrize(("secret", "reason"), [
    (f"{STRONG}NAS", "it contains the host name"),
    (f"Home{STRONG}", "it contains a label of the domain"),
    (f"{STRONG[:10]}ALICE{STRONG[10:]}", "it contains the login name"),
])
def test_names_in_the_password_are_refused_case_insensitively(secret: str, reason: str) -> None:
    assert reason in password_problems(secret, **NAMES)


def test_the_top_level_domain_and_very_short_names_are_not_searched() -> None:
    assert password_problems(f"{STRONG}arpa", **NAMES) == []
    assert password_problems(f"{STRONG}bo", login="bo", hostname="x", domain="ab.org") == []


def test_messages_never_contain_the_password_or_a_fragment_of_it() -> None:
    for secret in ["Zq8#xL2w", "alicealicealice12", "qwertyuiopasdfgh", "abcdefghijklmnop",
                   "19841984198419841984", f"nas{STRONG[:8]}"]:
        text = "; ".join(password_problems(secret, **NAMES))
        assert text, secret
        leaked = {f for f in fragments(secret) if f.casefold() in text.casefold()}
        # Only zxcvbn's fixed advice may share words with a password ("abc" examples).
        assert not leaked - fragments('Sequences like "abc" or "6543"'), (secret, leaked)


def test_minimum_length_is_configurable_upwards() -> None:
    assert password_problems(STRONG, min_length=24, **NAMES)[0] == (
        "it is shorter than 24 characters")


def test_long_passwords_are_rated_on_their_beginning() -> None:
    assert password_problems(STRONG * 10, **NAMES) == []


# --------------------------------------------------------------------------- model


def test_plaintext_password_is_refused_at_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    for plain in ["hunter2", 12345678901234567, STRONG]:
        with pytest.raises(INVALID) as info:
            validated(model(password=plain))
        (err,) = info.value.errors()
        assert err["loc"] == ("admins", 0, "password")
        assert err["type"] == "plaintext_password"
        assert "{env: VAR}" in err["msg"] and "password_hash" in err["msg"]
        assert str(plain) not in str(info.value)  # not even in pydantic's own rendering


def test_password_and_hash_are_exclusive() -> None:
    with pytest.raises(INVALID) as info:
        validated(model(password={"env": VAR},
                                    password_hash="$y$j9T$abc$def"))
    (err,) = info.value.errors()
    assert err["loc"] == ("admins", 0)
    assert "not both" in err["msg"]


def test_unreadable_password_passes_validation(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.delenv(VAR, raising=False)
    server = validated(model(password={"env": VAR}))
    assert server.admins[0].password is not None
    validated(model(password={"file": str(tmp_path / "nope")}))


@pytest.mark.parametrize("weak", WEAK)
def test_readable_weak_password_is_refused(monkeypatch: pytest.MonkeyPatch, weak: str) -> None:
    monkeypatch.setenv(VAR, weak)
    with pytest.raises(INVALID) as info:
        validated(model(password={"env": VAR}))
    (err,) = info.value.errors()
    (problem,) = err["ctx"]["problems"]
    assert problem[0] == ["admins", 0, "password"]
    assert problem[1].startswith(f"the password from env:{VAR} is too weak: ")
    assert weak not in str(info.value) and weak not in json.dumps(info.value.errors())


def test_readable_strong_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "alice-password"
    secret.write_text(STRONG + "\n")
    secret.chmod(0o600)
    server = validated(model(password={"file": str(secret)}))
    assert server.admins[0].has_password
    secret.write_text("password1234567\n")
    with pytest.raises(INVALID, match="too weak"):
        validated(model(password={"file": str(secret)}))


def test_the_check_follows_a_longer_pwquality_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, STRONG)
    data = model(password={"env": VAR})
    data["hardening"] = {"accounts": {"password_min_length": 24}}
    with pytest.raises(INVALID, match="shorter than 24 characters"):
        validated(data)


def test_password_counts_as_a_password_for_password_logins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    data = model(password={"env": VAR})
    data["hardening"] = {"ssh": {"password_authentication": True}}
    validated(data)  # no "every admin needs a password_hash"


# --------------------------------------------------------------------------- plan


def test_plan_names_the_source_never_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALICE_PASSWORD", STRONG)
    server = validated(model(password={"env": "ALICE_PASSWORD"}))
    plan = compile_server(server, Target())
    (user,) = [s for s in plan.steps if isinstance(s, User)]
    assert user.password == "secret:env:ALICE_PASSWORD" and user.password_hash is None
    assert ("admin user alice (groups: sudo; 1 SSH key(s), password set from env "
            "ALICE_PASSWORD, strength-checked)") in plan.render()
    data = json.dumps(plan.to_data())
    assert '"password": "secret:env:ALICE_PASSWORD"' in data
    assert STRONG not in data and STRONG not in plan.render()
    # sudo asks for the password, as with password_hash.
    assert "alice ALL=(ALL:ALL) ALL" in plan.files()[SUDOERS].splitlines()


def test_plan_without_password() -> None:
    plan = compile_server(validated(model()), Target())
    (step,) = [s for s in plan.to_data()["steps"] if s["step"] == "User"]
    assert step["password"] is None and step["password_hash"] is None
    assert "alice ALL=(ALL:ALL) NOPASSWD: ALL" in plan.files()[SUDOERS].splitlines()


def test_file_reference_is_described() -> None:
    step = User("alice", (), (), None, password="secret:file:~/.alice-password")
    assert step.describe().endswith("password set from file ~/.alice-password, "
                                    "strength-checked)")


# --------------------------------------------------------------------------- hashing


@needs_xcrypt
def test_yescrypt_with_the_login_defs_cost() -> None:
    setting = gensalt()
    assert setting.startswith("$y$jCT$")  # cost 8, as YESCRYPT_COST_FACTOR in login.defs
    assert gensalt() != setting  # a fresh salt each time
    h = crypt(STRONG, setting)
    assert h.startswith(setting + "$")
    assert crypt(STRONG, h) == h  # a whole hash works as its setting: how it is verified
    assert crypt(STRONG + "x", h) != h


@needs_xcrypt
def test_hash_for_keeps_the_current_hash_of_an_unchanged_password() -> None:
    current = hash_password(STRONG)
    setting = current.rsplit("$", 1)[0]
    assert hash_for(STRONG, setting, shadow_sha1(current)) == current
    other = hash_for("Another-Strong#Passphrase-91", setting, shadow_sha1(current))
    assert other != current and other.startswith("$y$")
    assert not other.startswith(setting)  # a new salt, not the old one
    # Unknown current state, or not yescrypt (upgraded): a new hash.
    assert hash_for(STRONG, None, None) != current
    assert hash_for(STRONG, "$6$rounds=65536$saltsalt", shadow_sha1(current)) != current


@needs_xcrypt
def test_known_yescrypt_vector() -> None:
    """A hash made by Debian 12's `chpasswd`/libxcrypt: the controller reproduces it."""
    assert crypt("Xk9#mQ2vL7pR4wZt8nBy", KNOWN) == KNOWN


def test_missing_libxcrypt_suggests_password_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    passwords._libcrypt.cache_clear()
    monkeypatch.setattr(passwords.ctypes.util, "find_library", lambda name: None)
    try:
        with pytest.raises(passwords.CryptUnavailable) as info:
            hash_password(STRONG)
        assert "give `password_hash` instead of `password`" in str(info.value)
        assert "mkpasswd -m yescrypt" in str(info.value)
    finally:
        passwords._libcrypt.cache_clear()


@pytest.mark.parametrize("bad", ["a\x00b" * 5, "x" * 600])
def test_unhashable_passwords(bad: str) -> None:
    with pytest.raises(ValueError):
        crypt(bad, "$y$jCT$abcdefghijklmnopqrstuv")


# --------------------------------------------------------------------------- state script

FAKE_GETENT = """#!/bin/sh
case "$1 $2" in
  "passwd alice") echo 'alice:x:1001:1001::/home/alice:/bin/bash' ;;
  "shadow alice") echo 'alice:KNOWN:19000::::::' ;;
  "passwd bob") echo 'bob:x:1002:1002::/home/bob:/bin/bash' ;;
  "shadow bob") echo 'bob:$6$rounds=65536$saltsalt$Q8u0Yj8gE8QZtE7y0Xb1m0vQwHh3b:19000::::::' ;;
  "passwd carol") echo 'carol:x:1003:1003::/home/carol:/bin/bash' ;;
  "shadow carol") echo 'carol:!$y$j9T$abc$lockedhashvalue:19000::::::' ;;
  "passwd dave") echo 'dave:x:1004:1004::/home/dave:/bin/bash' ;;
  "shadow dave") echo 'dave:abJnggxhB/yWI:19000::::::' ;;
  "passwd deployer") echo "deployer:x:1005:1005::$FAKE_HOME:/bin/bash" ;;
  *) exit 2 ;;
esac
"""
KNOWN = "$y$jCT$qJkA1gCQ6i6MIZd5E5hL0.$Kk6U.HQeF3P69oULdqEPyR9j52sQyD3tpX18g9omU7B"
"""yescrypt hash of "Xk9#mQ2vL7pR4wZt8nBy" made by Debian 12's chpasswd (libxcrypt)."""


def fake_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "getent").write_text(FAKE_GETENT.replace("KNOWN", KNOWN))
    (bin_dir / "id").write_text('#!/bin/sh\n[ "$1" = -nG ] && echo "$2" && exit 0\n'
                                'exec /usr/bin/id "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_USER", "DOAS_USER")}
    return {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", **extra}


def run(q: Query, env: dict[str, str]) -> tuple[str, Any]:
    res = subprocess.run(["/bin/sh", "-c", script(q)], capture_output=True, text=True,
                         env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout, parse(q, res.stdout.splitlines())


def test_state_reports_the_setting_never_the_hash(tmp_path: Path) -> None:
    q = Query(users=("alice", "bob", "carol", "dave"))
    out, st = run(q, fake_env(tmp_path))
    for secret in ("Kk6U.HQeF3P69oULdqEPyR9j52sQyD3tpX18g9omU7B", "Q8u0Yj8gE8QZtE7y0Xb1m",
                   "lockedhashvalue", "abJnggxhB/yWI"):
        assert secret not in out
    assert st.settings == {"alice": "$y$jCT$qJkA1gCQ6i6MIZd5E5hL0."}  # yescrypt only
    alice = st.users["alice"]
    assert alice is not None and alice.shadow_sha1 == shadow_sha1(KNOWN)
    assert all(st.users[u] is not None for u in q.users)
    assert st.upload_dir is None  # not asked


@needs_xcrypt
def test_state_and_hash_for_agree(tmp_path: Path) -> None:
    """The script's setting and sha1 let the controller recognise the current password."""
    q = Query(users=("alice",))
    _, st = run(q, fake_env(tmp_path))
    alice = st.users["alice"]
    assert alice is not None
    assert hash_for("Xk9#mQ2vL7pR4wZt8nBy", st.settings["alice"], alice.shadow_sha1) == KNOWN


def test_parse_setting_is_validated() -> None:
    q = Query(users=("a", "b", "c"))
    st = parse(q, ["W\t0\t/bin/bash\t/home/a\ta\t" + "0" * 40 + "\t$y$j9T$salt",
                   "W\t1\t/bin/bash\t/home/b\tb\t" + "0" * 40 + "\t-",
                   "W\t2\t/bin/bash\t/home/c\tc\t" + "0" * 40 + "\t$y$j9T$a b"])
    assert st.settings == {"a": "$y$j9T$salt"}


def test_upload_dir_without_sudo(tmp_path: Path) -> None:
    _, st = run(Query(upload_dir=True), fake_env(tmp_path))
    assert st.upload_dir == ""  # uploads go straight to their destination


def test_upload_dir_under_sudo_is_private(tmp_path: Path) -> None:
    """Under sudo, the login user's ~/.cache/selfhost-upload, 0700 (here the login user is
    the one running the tests, with a stand-in home)."""
    me = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    home = tmp_path / "home"
    home.mkdir()
    env = fake_env(tmp_path, SUDO_USER="deployer", FAKE_HOME=str(home))
    # `deployer` is really the current user: the script then runs mkdir without runuser.
    (tmp_path / "bin" / "id").write_text(
        '#!/bin/sh\n[ "$1" = -un ] && echo deployer && exit 0\nexec /usr/bin/id "$@"\n')
    (tmp_path / "bin" / "stat").write_text(
        f'#!/bin/sh\n/usr/bin/stat "$@" | sed "s/ {me}$/ deployer/"\n')
    (tmp_path / "bin" / "stat").chmod(0o755)
    upload = home / UPLOAD_DIR
    upload.mkdir(parents=True, mode=0o755)  # a wrong mode is fixed
    stale = upload / "old-upload"
    stale.write_text("left over")
    os.utime(stale, (0, 0))
    _, st = run(Query(upload_dir=True), env)
    assert st.upload_dir == str(upload)
    assert f"{upload.stat().st_mode & 0o777:o}" == "700"
    assert not stale.exists()  # stale uploads of failed deploys are removed


@pytest.mark.parametrize("line", [
    "X\t0\t/home/alice/.cache/selfhost-upload\t755 alice\talice",  # not private
    "X\t0\t/home/alice/.cache/selfhost-upload\t700 root\talice",  # not the login user's
    "X\t0\t/home/al ice/.cache/selfhost-upload\t700 alice\talice",  # unsafe for pyinfra's cp
    "X\t0\t/nonexistent/.cache/selfhost-upload\t\talice",  # could not be made
])
def test_parse_refuses_an_unsafe_upload_dir(line: str) -> None:
    assert parse(Query(upload_dir=True), [line]).upload_dir is None
    good = "X\t0\t/home/alice/.cache/selfhost-upload\t700 alice\talice"
    assert parse(Query(upload_dir=True), [good]).upload_dir == (
        "/home/alice/.cache/selfhost-upload")
    assert parse(Query(), [good]).upload_dir is None  # not asked: ignored
