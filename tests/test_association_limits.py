"""Per-member limits of the association module: each PHP member's own PHP-FPM master in its own
systemd slice (the plan's MemoryMax, CPUQuota, TasksMax), Debian's shared php-fpm masked, former
members' masters stopped, and disk quotas applied only where the file system has user quotas
(elsewhere said, never faked). The rendered files are checked by their validators on Debian."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from test_association import PHP, RELEASES, file_of, members, model, plan_of
from validators import Validators

from selfhost.compile import Target, compile_fleet
from selfhost.models.fleet import Fleet
from selfhost.services.association import (
    QUOTA_STATE,
    AssociationService,
    Member,
    Plan,
    fpm_unit,
    member_slice,
    pool_file,
)
from selfhost.validation import ModelError, validated

TEMPLATE = "/etc/systemd/system/selfhost-php@.service"


def steps(plan: Any, kind: str) -> list[Any]:
    return [s for s in plan.steps if type(s).__name__ == kind]


def command(plan: Any, start: str) -> Any:
    return next(s.command for s in steps(plan, "Run") if s.command.name.startswith(start))


def test_unit_names_escape_dashes() -> None:
    """A '-' in a slice name means a parent: member a-b's slice must not sit in member a's."""
    assert fpm_unit("alpha") == "selfhost-php@alpha.service"
    assert member_slice("alpha") == "selfhost-members-alpha.slice"
    assert member_slice("a-b") == "selfhost-members-a\\x2db.slice"
    assert fpm_unit("a-b") == "selfhost-php@a\\x2db.service"
    out = subprocess.run(["systemd-escape", "a-b"], capture_output=True, text=True)
    if out.returncode == 0:
        assert out.stdout.strip() == "a\\x2db"


@pytest.mark.parametrize("release", RELEASES)
def test_each_php_member_has_its_own_master_in_its_own_slice(release: str) -> None:
    plan = plan_of(release=release)
    v = PHP[release]
    template = file_of(plan, TEMPLATE).content
    for line in ("Type=notify", "Slice=selfhost-members-%i.slice",
                 f"ExecStartPre=/usr/sbin/php-fpm{v} -t -y /etc/selfhost/php-fpm/%I.conf",
                 f"ExecStart=/usr/sbin/php-fpm{v} --nodaemonize --fpm-config "
                 "/etc/selfhost/php-fpm/%I.conf",
                 "ExecReload=/bin/kill -USR2 $MAINPID", "WantedBy=multi-user.target"):
        assert line + "\n" in template, line
    alpha = file_of(plan, "/etc/systemd/system/selfhost-members-alpha.slice").content
    for line in ("[Slice]", "MemoryMax=512M", "CPUQuota=50%", "TasksMax=64"):
        assert line + "\n" in alpha, line
    pool = file_of(plan, pool_file(v, "alpha"))
    assert pool.path == "/etc/selfhost/php-fpm/alpha.conf"
    assert pool.validate == f"php-fpm{v} -t -y {{path}}"
    assert pool.content.index("[global]\n") < pool.content.index("[alpha]\n")
    assert "process.max = 4\n" in pool.content and "syslog.ident = php-fpm-alpha\n" in pool.content
    units = {s.name: s for s in steps(plan, "UnitState")}
    reloads = {s.unit: s for s in steps(plan, "Reload")}
    for m in ("alpha", "bravo"):
        assert units[f"selfhost-php@{m}.service"].running
        assert reloads[f"selfhost-php@{m}.service"].when == (
            pool_file(v, m), f"/etc/php/{v}/fpm/conf.d/90-selfhost.ini")
        assert reloads[f"selfhost-php@{m}.service"].action == "reload"
    # Debian's shared master is not a unit of the plan any more; charlie (static) has none.
    assert f"php{v}-fpm.service" not in units
    assert "selfhost-php@charlie.service" not in units
    paths = {s.file.path for s in steps(plan, "File")}
    assert "/etc/systemd/system/selfhost-members-charlie.slice" not in paths
    assert not any(p.startswith(f"/etc/php/{v}/fpm/pool.d/") for p in paths)


def test_plan_limits_and_defaults() -> None:
    data = model()
    data["services"]["association"]["plans"]["php"] = {"php": True, "databases": 1}
    plan = plan_of(data)
    alpha = file_of(plan, "/etc/systemd/system/selfhost-members-alpha.slice").content
    assert "MemoryMax=512M\nCPUQuota=100%\nTasksMax=64\n" in alpha
    assert Plan().disk_mb == 0
    assert not any(s.command.name.startswith("association: members' disk quotas")
                   for s in steps(plan, "Run"))
    assert "quota" not in steps(plan, "Packages")[0].names


def test_debian_php_fpm_masked_and_former_members_stopped() -> None:
    cleanup = command(plan_of(), "association: Debian's shared php-fpm off")
    assert cleanup.after_files
    assert "systemctl mask php8.2-fpm.service" in cleanup.command
    assert '" alpha bravo "' in cleanup.command  # the masters to keep
    assert "/etc/php/8.2/fpm/pool.d/selfhost-*.conf" in cleanup.unless


@pytest.mark.parametrize("association,loc,message", [
    ({"plans": {"php": {"php": True, "databases": 1, "php_memory_mb": 256, "memory_mb": 128}}},
     "services.association.plans.php.memory_mb", "less than one PHP request's php_memory_mb"),
    ({"plans": {"php": {"php": True, "databases": 1, "php_workers": 16, "tasks": 16}}},
     "services.association.plans.php.tasks", "no room for php_workers 16"),
])
def test_limits_that_cannot_fit_fail_at_their_model_path(association: dict[str, Any], loc: str,
                                                        message: str) -> None:
    data = model(**association)
    data["services"]["association"]["plans"]["small"] = {}
    with pytest.raises(ModelError) as err:
        validated(data)
    assert loc in str(err.value) and message in str(err.value), str(err.value)


def test_disk_quota_warning_and_guarded_command() -> None:
    fleet = Fleet.of(validated(model()))
    [plan] = compile_fleet(fleet, {"asso": Target(release="bookworm",  # type: ignore[arg-type]
                                                  in_container=True)}).values()
    assert "quota" in steps(plan, "Packages")[0].names
    cmd = command(plan, "association: members' disk quotas")
    # 2048 MB hard, 90 % soft, in KiB; charlie's plan has no quota.
    assert 'setquota -u alpha 1887436 2097152 0 0 "$mp"' in cmd.command
    assert 'setquota -u bravo 1887436 2097152 0 0 "$mp"' in cmd.command
    assert "charlie" not in cmd.command
    assert "disk quotas NOT applied" in cmd.command and QUOTA_STATE in cmd.command
    assert "quotaon -pu" in cmd.unless and "repquota -u" in cmd.unless


def test_disk_quota_model_warning() -> None:
    from selfhost.compile.compiler import prepare

    _, warnings = prepare(Fleet.of(validated(model())))
    [ws] = warnings.values()
    [w] = [w for w in ws if "disk_mb" in w.message]
    assert w.severity == "warning" and w.loc == ("services", "association", "plans")


def _sh(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                          check=False)


def test_disk_quota_shell_without_and_with_user_quotas(tmp_path: Any) -> None:
    """The guard and command run for real against stub quota tools: without user quotas the
    command says so once (the guard then holds); with them it sets the limits, and the
    guard holds once repquota shows them."""
    svc = AssociationService(plans={"p": Plan(disk_mb=10)}, members=[
        Member(name="alpha", email="a@a.example", plan="p"),
        Member(name="a-b", email="b@b.example", plan="p")])
    quotas = svc.quotas()
    assert quotas == [("a-b", 9216, 10240), ("alpha", 9216, 10240)]
    state = tmp_path / "state"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    stubs = {
        "findmnt": 'case "$*" in *TARGET*) echo /srv;; *) echo overlay;; esac',
        "quotaon": f'[ -e {tmp_path}/on ] && echo "user quota on /srv (/dev/x) is on" || '
                   'echo "user quota on /srv (/dev/x) is off"',
        "setquota": f'echo "$2 -- 0 $3 $4 0 0 0" >> {tmp_path}/rep',
        "repquota": f"cat {tmp_path}/rep 2>/dev/null",
        "logger": "true",
    }
    for name, body in stubs.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    guard = svc.quota_guard(quotas).replace(QUOTA_STATE, str(state))
    cmd = svc.quota_command(quotas).replace(QUOTA_STATE, str(state))
    env = {"PATH": f"{bin_}:/usr/bin:/bin"}
    assert _sh(guard, env).returncode != 0
    res = _sh(cmd, env)
    assert res.returncode == 0, res.stderr
    assert "disk quotas NOT applied: /srv (overlay) holding /srv/members has no user " \
        "quotas on" in res.stderr
    assert state.read_text() == "unsupported overlay /srv\na-b 9216 10240\nalpha 9216 10240\n"
    assert _sh(guard, env).returncode == 0  # reported once
    (tmp_path / "on").touch()
    assert _sh(guard, env).returncode != 0
    res = _sh(cmd, env)
    assert res.returncode == 0 and not state.exists(), res.stderr
    assert (tmp_path / "rep").read_text() == "a-b -- 0 9216 10240 0 0 0\n" \
        "alpha -- 0 9216 10240 0 0 0\n"
    assert _sh(guard, env).returncode == 0
    svc.plans["p"] = Plan(disk_mb=20)
    assert _sh(svc.quota_guard(svc.quotas()), env).returncode != 0  # a new limit: set again


def test_member_with_a_dash_gets_its_own_slice() -> None:
    data = model(members=members({"name": "a-b", "email": "x@y.example", "plan": "php",
                                  "sites": [{"domain": "ab.example", "php": True}]}))
    plan = plan_of(data)
    paths = {s.file.path for s in steps(plan, "File")}
    assert "/etc/systemd/system/selfhost-members-a\\x2db.slice" in paths
    assert "selfhost-php@a\\x2db.service" in {s.name for s in steps(plan, "UnitState")}


@pytest.mark.parametrize("release", RELEASES)
def test_units_and_pools_pass_their_checks(release: str, validators: Validators) -> None:
    plan = plan_of(release=release)
    validators.prepare(release, plan)
    template = file_of(plan, TEMPLATE)
    slice_ = file_of(plan, "/etc/systemd/system/selfhost-members-alpha.slice")
    pool = file_of(plan, pool_file(PHP[release], "alpha"))
    for f, broken in ((template, template.content.replace("/usr/sbin/php-fpm", "/usr/sbin/no-such-fpm")),
                      (pool, pool.content.replace("[global]", "[global]\nno_such = 1"))):
        ok = validators.check(release, f.path, f.content, f.validate)
        assert ok.returncode == 0, (f.path, (ok.stdout + ok.stderr).decode())
        res = validators.check(release, f.path, broken, f.validate)
        assert res.returncode != 0, f.path
    assert slice_.validate is None or validators.check(
        release, slice_.path, slice_.content, slice_.validate).returncode == 0
