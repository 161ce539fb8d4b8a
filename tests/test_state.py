"""The batched state script: generated shell, run for real with /bin/sh against files made in
tmp_path, and its parser. Units, packages and users (which need systemd, dpkg and real
accounts) are also checked on canned output lines."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from selfhost.state import (
    FileState,
    Prechecks,
    Query,
    Space,
    State,
    UserState,
    packed,
    parse,
    script,
)

ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name


def run(q: Query) -> tuple[list[str], State]:
    res = subprocess.run(["/bin/sh", "-c", script(q)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    return lines, parse(q, lines)


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Real execution


def test_files(tmp_path: Path) -> None:
    conf = tmp_path / "app.conf"
    conf.write_bytes(b"key = value\n")
    conf.chmod(0o640)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    empty.chmod(0o600)
    suid = tmp_path / "tool"
    suid.write_bytes(b"\x00\xff binary")
    suid.chmod(0o4755)
    odd = tmp_path / "it's a file; $(echo pwned)"
    odd.write_bytes(b"odd\n")
    odd.chmod(0o644)
    missing = tmp_path / "missing"
    a_dir = tmp_path / "dir"
    a_dir.mkdir()

    q = Query(files=tuple(map(str, (conf, empty, suid, odd, missing, a_dir))))
    _, st = run(q)

    assert st.files[str(conf)] == FileState(sha1(b"key = value\n"), "0640", ME, MY_GROUP)
    assert st.files[str(empty)] == FileState(sha1(b""), "0600", ME, MY_GROUP)
    assert st.files[str(suid)] == FileState(sha1(b"\x00\xff binary"), "4755", ME, MY_GROUP)
    assert st.files[str(odd)] == FileState(sha1(b"odd\n"), "0644", ME, MY_GROUP)
    assert st.files[str(missing)] is None
    assert st.files[str(a_dir)] is None  # a directory is not the file we manage
    assert not (tmp_path / "pwned").exists()


def test_dirs(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    sticky = tmp_path / "shared dir"
    sticky.mkdir()
    sticky.chmod(0o1777)
    a_file = tmp_path / "file"
    a_file.write_text("x")

    q = Query(dirs=(str(private), str(sticky), str(a_file), str(tmp_path / "nope")))
    _, st = run(q)
    assert st.dirs[str(private)] == FileState("-", "0700", ME, MY_GROUP)
    assert st.dirs[str(sticky)] == FileState("-", "1777", ME, MY_GROUP)
    assert st.dirs[str(a_file)] is None
    assert st.dirs[str(tmp_path / "nope")] is None


def test_guards(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    flag.write_text("ready\n")
    guards = (
        "true",
        "false",
        f"test -f {flag}",
        f"test -f {tmp_path}/absent",
        f"grep -qx ready {flag} && echo noise && echo more noise >&2",
        "exit 3",
        f"test \"$(cat {flag})\" = ready",
        "awk 'BEGIN {exit 1}'",
    )
    lines, st = run(Query(guards=guards))
    assert [st.guards[g] for g in guards] == [True, False, True, False, True, False, True, False]
    assert not [ln for ln in lines if "noise" in ln]  # guard output never reaches the parser


@pytest.mark.parametrize("where", ["shm", "tmpdir", "none"])
def test_guards_are_read_at_the_same_time(tmp_path: Path, where: str) -> None:
    # Eight guards of 0.5 s each: together about 0.5 s, not 4 s. Without /dev/shm, in a
    # directory under $TMPDIR (an earlier version made it there but never read it back: every
    # guard and unit answer was lost); without any temporary directory (mktemp fails), one
    # after the other, with the same answers.
    guards = tuple(f"sleep 0.5; test {i} -lt 4" for i in range(8))
    env = dict(os.environ)
    parallel = where != "none"
    if where != "shm":
        stub = tmp_path / "bin"
        stub.mkdir()
        real = shutil.which("mktemp")
        (stub / "mktemp").write_text(
            "#!/bin/sh\nexit 1\n" if where == "none" else
            f'#!/bin/sh\ncase "$*" in */dev/shm/*) exit 1;; esac\nexec {real} "$@"\n')
        (stub / "mktemp").chmod(0o755)
        env["PATH"] = f"{stub}:{env['PATH']}"
        env["TMPDIR"] = str(tmp_path)
    t0 = time.monotonic()
    res = subprocess.run(["/bin/sh", "-c", script(Query(guards=guards))], capture_output=True,
                         text=True, timeout=30, env=env)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    st = parse(Query(guards=guards), res.stdout.splitlines())
    assert [st.guards[g] for g in guards] == [True] * 4 + [False] * 4
    assert (took < 3) if parallel else (took >= 4)
    assert not list(tmp_path.glob("selfhost-par.*"))  # the $TMPDIR directory is removed too


def test_the_parallel_reads_clean_up_only_their_own_directory(tmp_path: Path) -> None:
    # The space check sets $d to an existing directory: the guards' temporary directory has
    # a name of its own (an earlier version removed "$d" at the end: here, tmp_path).
    keep = tmp_path / "keep"
    keep.write_text("x")
    before = set(Path("/dev/shm").glob("selfhost-par.*"))
    q = Query(guards=("true",), space=(str(tmp_path / "sub" / "file"),))
    _, st = run(q)
    assert st.guards["true"] and st.space[str(tmp_path / "sub" / "file")] is not None
    assert keep.read_text() == "x"
    assert set(Path("/dev/shm").glob("selfhost-par.*")) <= before


def test_one_round_trip_for_everything(tmp_path: Path) -> None:
    """Many entries of every kind in one script; indexes past 9 map back correctly."""
    files = []
    for i in range(12):
        p = tmp_path / f"f{i}"
        p.write_text(str(i))
        files.append(str(p))
    dirs = [str(tmp_path)] * 2 + [str(tmp_path / "none")]
    guards = [f"test -f {f}" for f in files] + [f"test -d {files[0]}"]
    _, st = run(Query(files=tuple(files), dirs=tuple(dirs), guards=tuple(guards)))
    for i, f in enumerate(files):
        assert st.files[f] is not None and st.files[f].sha1 == sha1(str(i).encode())
    assert all(st.guards[g] for g in guards[:-1]) and not st.guards[guards[-1]]
    assert st.dirs[str(tmp_path / "none")] is None and st.dirs[str(tmp_path)] is not None


def test_empty_query() -> None:
    lines, st = run(Query())
    assert lines == []
    assert st == State()


def test_script_survives_missing_tools_and_names(tmp_path: Path) -> None:
    """Unknown packages, units and users produce defaults, and the script still exits 0."""
    q = Query(units=("selfhost-no-such.service",), packages=("selfhost-no-such-package",),
              users=("selfhost-no-such-user",), files=(str(tmp_path / "x"),))
    _, st = run(q)
    assert st.packages == {"selfhost-no-such-package": False}
    assert st.users == {"selfhost-no-such-user": None}
    assert st.files == {str(tmp_path / "x"): None}
    assert st.units["selfhost-no-such.service"][1] != "active"


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system")
def test_packages_for_real() -> None:
    _, st = run(Query(packages=("dpkg", "selfhost-no-such-package")))
    assert st.packages == {"dpkg": True, "selfhost-no-such-package": False}


def test_users_for_real() -> None:
    _, st = run(Query(users=(ME, "selfhost-no-such-user")))
    me = st.users[ME]
    entry = pwd.getpwnam(ME)
    assert me is not None
    assert (me.shell, me.home) == (entry.pw_shell, entry.pw_dir)
    groups = {grp.getgrgid(g).gr_name for g in os.getgrouplist(ME, entry.pw_gid)}
    assert set(me.groups) == groups
    assert len(me.shadow_sha1) == 40
    assert st.users["selfhost-no-such-user"] is None


FAKE_GETENT = """#!/bin/sh
case "$1 $2" in
  "passwd alice") echo 'alice:x:1001:1001:Alice:/home/alice:/bin/bash' ;;
  "shadow alice") echo 'alice:$y$j9T$abc$def:19000:0:99999:7:::' ;;
  *) exit 2 ;;
esac
"""
FAKE_ID = """#!/bin/sh
[ "$1 $2" = "-nG alice" ] && echo "alice sudo users" || exit 1
"""


def fake_accounts(bin_dir: Path) -> dict[str, str]:
    """PATH with stand-ins for getent and id that know one account, alice."""
    bin_dir.mkdir()
    for name, text in (("getent", FAKE_GETENT), ("id", FAKE_ID)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_users_from_a_stubbed_account_database(tmp_path: Path) -> None:
    """The users part, run for real against getent/id stand-ins (reading /etc/shadow for a
    real admin account would need root and such an account)."""
    q = Query(users=("alice", "bob"))
    res = subprocess.run(["/bin/sh", "-c", script(q)], capture_output=True, text=True,
                         env=fake_accounts(tmp_path / "bin"), timeout=30)
    assert res.returncode == 0, res.stderr
    st = parse(q, res.stdout.splitlines())
    assert st.users == {
        "alice": UserState("/bin/bash", "/home/alice", ("alice", "sudo", "users"),
                           sha1(b"$y$j9T$abc$def\n")),
        "bob": None,
    }


def test_symlinked_file_reports_the_mode_of_what_it_hashes(tmp_path: Path) -> None:
    target = tmp_path / "real.conf"
    target.write_text("x\n")
    target.chmod(0o644)
    link = tmp_path / "link.conf"
    link.symlink_to(target)
    _, st = run(Query(files=(str(link),)))
    assert st.files[str(link)] == FileState(sha1(b"x\n"), "0644", ME, MY_GROUP)


def test_script_quotes_names() -> None:
    text = script(Query(files=("/etc/a b",), units=("x;reboot",), users=("u$(id)",),
                        packages=("p`id`",)))
    assert "\n0/etc/a b\n" in text  # a line of the quoted here-document of paths
    assert "'x;reboot'" in text and "'u$(id)'" in text and "'p`id`'" in text


# --------------------------------------------------------------------------------------------
# Parser on canned output (units, packages, users need a real Debian host)


def test_parse_units() -> None:
    q = Query(units=("ssh.service", "caddy.service", "apt-daily.timer", "gone.service"))
    st = parse(q, [
        "U\t0\tenabled\tactive",
        "U\t1\tdisabled\tinactive",
        "U\t2\tstatic",  # trailing empty field stripped by the transport
        "U\t3",
    ])
    assert st.units == {
        "ssh.service": ("enabled", "active"),
        "caddy.service": ("disabled", "inactive"),
        "apt-daily.timer": ("static", ""),
        "gone.service": ("", ""),
    }


def test_parse_packages() -> None:
    q = Query(packages=("caddy", "nftables", "fail2ban", "sudo"))
    st = parse(q, ["P\tcaddy\tii ", "P\tnftables\trc ", "P\tfail2ban\tun ",
                   "P\tsudo\tiF "])  # half-configured: not installed properly
    assert st.packages == {"caddy": True, "nftables": False, "fail2ban": False, "sudo": False}


def test_parse_held_package_is_installed() -> None:
    st = parse(Query(packages=("caddy",)), ["P\tcaddy\thi "])
    assert st.packages == {"caddy": True}


def test_parse_users() -> None:
    q = Query(users=("alice", "bob", "carol"))
    st = parse(q, [
        "W\t0\t/bin/bash\t/home/alice\talice,sudo\t" + "a" * 40,
        "W\t1\t-",
        "W\t2\t/bin/sh",  # truncated line: ignored
    ])
    assert st.users == {
        "alice": UserState("/bin/bash", "/home/alice", ("alice", "sudo"), "a" * 40),
        "bob": None,
        "carol": None,
    }


def test_parse_ignores_noise() -> None:
    """Banners or motd text on stdout must not be mistaken for state."""
    q = Query(files=("/etc/x",), guards=("true",))
    st = parse(q, ["Welcome to Debian!", "", "F\tx\tdeadbeef\t644 root root",
                   "G", "Z\t0\t1", "F\t0\t" + "b" * 40 + "\t644 root root"])
    assert st.files == {"/etc/x": FileState("b" * 40, "0644", "root", "root")}
    assert st.guards == {"true": False}


def test_parse_defaults_when_nothing_is_printed() -> None:
    q = Query(files=("/a",), dirs=("/d",), guards=("g",), units=("u",), packages=("p",),
              users=("w",))
    assert parse(q, []) == State(files={"/a": None}, dirs={"/d": None}, guards={"g": False},
                                 units={"u": ("", "")}, packages={"p": False}, users={"w": None})


# --------------------------------------------------------------------------------------------
# What the target can do (prechecks) and free space


def test_prechecks_and_space_for_real(tmp_path: Path) -> None:
    deep = tmp_path / "not" / "yet" / "there.conf"
    lines, st = run(Query(prechecks=True, space=(str(deep), "/")))
    assert [ln.split("\t")[:2] for ln in lines if ln.startswith("C")][:3] == [
        ["C", "0"], ["C", "1"], ["C", "2"]]
    assert st.prechecks.net_admin is not None
    space = st.space[str(deep)]
    assert space is not None and space.avail_kib > 0
    # a path that does not exist yet is measured at its nearest existing parent
    df = subprocess.run(["df", "-P", "-k", str(tmp_path)], capture_output=True, text=True)
    assert space.mount == df.stdout.splitlines()[1].split()[-1]


def test_parse_prechecks() -> None:
    q = Query(prechecks=True, space=("/etc/caddy/Caddyfile", "/srv/www/x/index.html"))
    st = parse(q, ["C\t0\t3", "C\t1\tunattended-upgr (pid 42)", "C\t2\t00000000a80425fb",
                   "C\t3\t0", "S\t0\t12\t/etc/caddy\t2048\t2000",
                   "S\t1\t99999\t/\t0\t0"])
    assert st.prechecks.dpkg_interrupted and st.prechecks.apt_busy == "unattended-upgr (pid 42)"
    assert st.prechecks.net_admin is False and st.prechecks.nft_works is False
    assert st.space["/etc/caddy/Caddyfile"] == Space(12, 2000, "/etc/caddy")
    assert st.space["/srv/www/x/index.html"] == Space(99999, None, "/")  # no inode count
    full = parse(q, ["C\t0\t0", "C\t1\t", "C\t2\t000001ffffffffff"])
    assert not full.prechecks.dpkg_interrupted and full.prechecks.apt_busy == ""
    assert full.prechecks.net_admin is True and full.prechecks.nft_works is None
    assert parse(q, []).prechecks == Prechecks() and parse(q, []).space == dict.fromkeys(q.space)


def test_pending_markers() -> None:
    q = Query(pending=True)
    assert "/var/lib/selfhost/pending/*" in script(q)
    st = parse(q, ["N\t0\treload-ssh.service", "N\t0\trun-0123456789abcdef"])
    assert st.pending == {"reload-ssh.service", "run-0123456789abcdef"}
    assert parse(Query(), ["N\t0\treload-ssh.service"]).pending == set()  # not asked for


def test_the_packed_script_is_small_and_runs_the_same(tmp_path: Path) -> None:
    # A site of 3000 files: the raw script is far past Linux's 128 KiB limit for one argument
    # once pyinfra's connectors quote it again (seen with the mail example: "Argument list
    # too long"); the packed command is small, has no quote to escape, and prints the same.
    files = []
    for i in range(3000):
        p = tmp_path / "site" / f"d{i % 40}" / f"page-{i:04d}.html"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"<p>{i}</p>")
        files.append(str(p))
    (tmp_path / "site" / "d3" / "page-0003.html.selfhost-new").write_text("cut")
    q = Query(files=tuple(files), guards=("true", "false"), pending=True)
    raw = script(q)
    assert len(raw) > 128 * 1024
    cmd = packed(raw)
    assert len(cmd) < 64 * 1024 and "'" not in cmd and '"' in cmd
    res = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    direct = subprocess.run(["/bin/sh"], input=raw, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == direct.stdout, res.stderr
    st = parse(q, res.stdout.splitlines())
    assert st.files[files[1234]] is not None and st.staged == {files[3]}
    assert st.guards == {"true": True, "false": False}
    # Its temporary copy is gone.
    assert not list(Path("/dev/shm").glob("selfhost-state.*"))


def test_hostile_file_names_are_read_as_names(tmp_path: Path) -> None:
    # A site's files come with any name: each is a line of a quoted here-document, read as
    # data; a name with a newline gets its own quoted command.
    names = ["a b", "$(touch pwned)", "`touch pwned`", "it's", 'q"q', "-n", "x\\y", "tab\there",
             "SELFHOST_FILES", "new\nline", " lead", "trail "]
    paths = []
    for i, n in enumerate(names):
        d = tmp_path / f"d{i}"
        d.mkdir()
        (d / n).write_text(n)
        paths.append(str(d / n))
    _, st = run(Query(files=(*paths, str(tmp_path / "missing"))))
    for p, n in zip(paths, names, strict=True):
        assert st.files[p] is not None and st.files[p].sha1 == sha1(n.encode()), n
    assert st.files[str(tmp_path / "missing")] is None
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
