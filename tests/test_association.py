"""The association module: model rules at their model paths, what it requests of the others
(users, virtual hosts with PHP, backup sources), the rendered pool, SQL and MariaDB files,
the web module's php_fastcgi route, and, in a Debian container of each release, the files'
own checks (php-fpm -t, php, mariadbd) accepting them and refusing broken versions."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from validators import Validators

from selfhost.backend.pyinfra import mysql_native_hash
from selfhost.compile import Target, compile_fleet
from selfhost.compose.requests import BackupSource, SystemUser, VirtualHost
from selfhost.compose.resources import SECRET_MARK
from selfhost.config import load_fleet
from selfhost.models.fleet import Fleet
from selfhost.services.association import MARIADB_CNF, SQL, pool_file
from selfhost.services.web import CADDYFILE
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "association.yaml"
RELEASES = ("bookworm", "trixie")
PHP = {"bookworm": "8.2", "trixie": "8.4"}


def model(**association: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["services"]["association"].update(copy.deepcopy(association))
    return data


def members(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    base: list[dict[str, Any]] = yaml.safe_load(EXAMPLE.read_text())["services"][
        "association"]["members"]
    return base + list(extra)


def plan_of(data: dict[str, Any] | None = None, release: str = "bookworm") -> Any:
    fleet = load_fleet(EXAMPLE) if data is None else Fleet.of(validated(data))
    [plan] = compile_fleet(fleet, {"asso": Target(release=release,  # type: ignore[arg-type]
                                                  in_container=True)}).values()
    return plan


def file_of(plan: Any, path: str) -> Any:
    return next(s.file for s in plan.steps if type(s).__name__ == "File" and s.file.path == path)


def routed(data: dict[str, Any] | None = None) -> Any:
    from selfhost.compose.route import route_host

    server = validated(data or yaml.safe_load(EXAMPLE.read_text()))
    fleet = Fleet.of(server)
    [host] = fleet.hosts
    return route_host(fleet, host, server.modules())


# ------------------------------------------------------------------------------ model


@pytest.mark.parametrize("association,loc,message", [
    ({"members": members({"name": "delta", "email": "d@d.example", "plan": "gold"})},
     "services.association.members.3.plan", "no plan named 'gold' (plans: php, small)"),
    ({"members": members({"name": "alpha", "email": "d@d.example"})},
     "services.association.members.3.name", "member alpha is listed twice"),
    ({"members": members({"name": "antoine", "email": "d@d.example"})},
     "services.association.members.3.name", "has the name of an admin"),
    ({"members": members({"name": "mysql", "email": "d@d.example"})},
     "services.association.members.3.name", "mysql is a system account's name"),
    ({"members": members({"name": "www-data", "email": "d@d.example"})},
     "services.association.members.3.name", "www-data is a system account's name"),
    ({"members": members({"name": "delta", "email": "d@d.example",
                          "sites": [{"domain": "bravo.example"}]})},
     "services.association.members.3.sites.0.domain", "site bravo.example is listed twice"),
    ({"members": members({"name": "delta", "email": "d@d.example",
                          "sites": [{"domain": "delta.example", "php": True}]})},
     "services.association.members.3.sites.0.php", "plan small does not allow PHP"),
    ({"members": members({"name": "delta", "email": "d@d.example", "plan": "php",
                          "databases": ["d1", "d2"], "database_password": {"env": "X"}})},
     "services.association.members.3.databases", "2 databases, but plan php allows 1"),
    ({"members": members({"name": "delta", "email": "d@d.example", "plan": "php",
                          "databases": ["d1"]})},
     "services.association.members.3.database_password", "give database_password"),
    ({"members": members({"name": "delta", "email": "d@d.example", "plan": "php",
                          "databases": ["bravo_site"], "database_password": {"env": "X"}})},
     "services.association.members.3.databases.0", "database bravo_site is listed twice"),
    ({"members": members({"name": "delta", "email": "d@d.example", "plan": "php",
                          "databases": ["mysql"], "database_password": {"env": "X"}})},
     "services.association.members.3.databases.0", "a database of MariaDB itself"),
])
def test_model_errors_point_at_their_model_path(association: dict[str, Any], loc: str,
                                                 message: str) -> None:
    with pytest.raises(ModelError) as err:
        validated(model(**association))
    assert f"{loc}: " in str(err.value) and message in str(err.value), str(err.value)


def test_a_member_site_clashing_with_a_web_site_is_a_conflict() -> None:
    data = model()
    data["services"]["web"] = {"sites": [{"host": "charlie.asso.example"}]}
    with pytest.raises(ModelError) as err:
        validated(data)
    assert ("virtual host charlie.asso.example is requested by both "
            "services.association.members.2.sites.0 and services.web.sites.0") in str(err.value)


@pytest.mark.parametrize("member,message", [
    ({"name": "Delta", "email": "d@d.example"}, "a member name is"),
    ({"name": "delta_x", "email": "d@d.example"}, "a member name is"),
    ({"name": "delta", "email": "not an address"}, "should match pattern"),
    ({"name": "delta", "email": "d@d.example", "sites": [{"domain": "localhost"}]},
     "not a full host name"),
    ({"name": "delta", "email": "d@d.example", "databases": ["Bad-Name"]},
     "a database name is"),
    ({"name": "delta", "email": "d@d.example", "database_password": "in clear"},
     "a secret is never written in the model"),
])
def test_bad_values_are_refused(member: dict[str, Any], message: str) -> None:
    with pytest.raises((ValidationError, ModelError), match=message):
        validated(model(members=members(member)))


def test_a_plan_name_is_one_word() -> None:
    with pytest.raises(ValidationError, match="a plan name is"):
        validated(model(plans={"small; php_admin_value[open_basedir] = /": {}}))


def test_plans_have_safe_defaults() -> None:
    data = model()
    del data["services"]["association"]["plans"]
    server = validated(data)
    svc = server.services.association
    assert svc is not None
    assert svc.plans["small"].php is False and svc.plans["small"].databases == 0
    assert svc.plans["php"].php is True


# ------------------------------------------------------------------------------ requests


def test_requests_users_vhosts_and_backup_sources() -> None:
    r = routed()
    users = {u.name: u for u in r.requests[SystemUser] if isinstance(u, SystemUser)}
    assert users["alpha"].home == "/srv/members/alpha"
    assert users["alpha"].origin == "services.association.members.0"
    vhosts = {v.host: v for v in r.requests[VirtualHost] if isinstance(v, VirtualHost)}
    assert vhosts["alpha.asso.example"].php_fastcgi == "/run/php/selfhost-alpha.sock"
    assert vhosts["alpha.asso.example"].root == "/srv/members/alpha/sites/alpha.asso.example"
    assert vhosts["charlie.asso.example"].php_fastcgi is None
    sources = {b.path: b for b in r.requests[BackupSource] if isinstance(b, BackupSource)}
    for m in ("alpha", "bravo", "charlie"):
        assert sources[f"/srv/members/{m}"].origin.startswith("services.association.members.")
    assert sources["/var/backups/selfhost/mariadb"].before == "/usr/local/lib/selfhost/mariadb-dump"


def test_caddyfile_sends_php_to_the_members_pool() -> None:
    caddy = file_of(plan_of(), CADDYFILE).content
    block = caddy.split("alpha.asso.example {", 1)[1].split("\n}\n", 1)[0]
    assert "\troot * /srv/members/alpha/sites/alpha.asso.example\n" in block
    assert "\tphp_fastcgi unix//run/php/selfhost-alpha.sock\n" in block
    static = caddy.split("charlie.asso.example {", 1)[1].split("\n}\n", 1)[0]
    assert "php_fastcgi" not in static and "file_server" in static


# ------------------------------------------------------------------------------ rendered


def test_php_mail_is_allowed_only_where_the_mail_service_counts_it() -> None:
    """With the host's mail service (which pins a login's sender and holds its mail past the
    limits), a member's mail() goes through sendmail as the member, naming the script."""
    data = model()
    data["services"]["mail"] = {"domains": [{"name": "asso.example"}]}
    pool = file_of(plan_of(data), pool_file(PHP["bookworm"], "alpha")).content
    assert "php_admin_value[sendmail_path] = /usr/sbin/sendmail -t -i\n" in pool
    assert "php_admin_flag[mail.add_x_header] = on\n" in pool
    disabled = next(x for x in pool.splitlines() if x.startswith("php_admin_value[disable_f"))
    assert "mail" not in disabled.split(" = ")[1].split(",")
    assert "exec" in disabled.split(" = ")[1].split(",")
    data = model()
    del data["services"]["mail"]
    del data["services"]["radicale"]  # no member password below: no one to log in there
    for m in data["services"]["association"]["members"]:  # no mail service: no mailboxes
        for key in ("mailboxes", "aliases", "password"):
            m.pop(key, None)
    data["services"]["association"]["members"][0].pop("lists", None)  # lists need mail
    without = file_of(plan_of(data), pool_file(PHP["bookworm"], "alpha")).content
    assert "mail.add_x_header" not in without and "sendmail_path] = /bin/false" in without


@pytest.mark.parametrize("release", RELEASES)
def test_pool_runs_as_the_member_within_its_home(release: str) -> None:
    plan = plan_of(release=release)
    pool = file_of(plan, pool_file(PHP[release], "alpha")).content
    for line in ("[alpha]", "user = alpha", "group = alpha",
                 "listen = /run/php/selfhost-alpha.sock", "listen.group = caddy",
                 "listen.mode = 0660", "pm.max_children = 4",
                 "php_admin_value[open_basedir] = /srv/members/alpha/",
                 "php_admin_value[upload_tmp_dir] = /srv/members/alpha/tmp",
                 "php_admin_value[memory_limit] = 128M",
                 "php_admin_value[sendmail_path] = /usr/sbin/sendmail -t -i"):
        assert line + "\n" in pool, line
    disabled = next(x for x in pool.splitlines() if x.startswith("php_admin_value[disable_f"))
    for fn in ("exec", "shell_exec", "system", "proc_open", "popen"):
        assert fn in disabled.split(" = ")[1].split(",")
    assert "mail" not in disabled.split(" = ")[1].split(",")  # the host has the mail service
    # charlie has no PHP site: no pool
    assert not any(type(s).__name__ == "File" and s.file.path == pool_file(PHP[release],
                                                                            "charlie")
                   for s in plan.steps)


def test_directories_keep_members_apart() -> None:
    dirs = {s.dir.path: s.dir for s in plan_of().steps
            if type(s).__name__ == "Directory"}
    assert dirs["/srv/members"].mode == "0711"
    home = dirs["/srv/members/alpha"]
    assert (home.mode, home.owner, home.group) == ("0750", "alpha", "caddy")
    tmp = dirs["/srv/members/alpha/tmp"]
    assert (tmp.mode, tmp.owner, tmp.group) == ("0700", "alpha", "alpha")


def test_sql_holds_hashes_only_and_rights_are_granted_again() -> None:
    sql = file_of(plan_of(), SQL)
    assert sql.mode == "0600" and sql.opaque
    assert [p.transform for p in sql.secrets] == ["mysql-native", "mysql-native"]
    text = sql.content
    assert "molecule" not in text and SECRET_MARK.format(1) in text
    alpha = text.index("REVOKE ALL PRIVILEGES, GRANT OPTION FROM 'alpha'@'localhost';")
    assert text.index("GRANT ALL PRIVILEGES ON `alpha_site`.* TO 'alpha'@'localhost';") > alpha
    assert "`bravo_site`.* TO 'alpha'" not in text


def test_mysql_native_hash_is_mariadbs() -> None:
    # SELECT PASSWORD('password') in MariaDB
    assert mysql_native_hash("password") == "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"


def test_mariadb_local_only() -> None:
    cnf = file_of(plan_of(), MARIADB_CNF).content
    assert "bind-address = 127.0.0.1\n" in cnf and "local-infile = 0\n" in cnf


def test_no_php_no_database_no_package() -> None:
    data = model(members=[{"name": "delta", "email": "d@d.example",
                           "sites": [{"domain": "delta.example"}]}])
    del data["services"]["radicale"]  # delta has no password: no one to log in there
    packages = next(s for s in plan_of(data).steps if type(s).__name__ == "Packages").names
    assert "caddy" in packages
    assert not {"php-fpm", "mariadb-server"} & set(packages)


# ------------------------------------------------------------------------------ on Debian


@pytest.mark.parametrize("release", RELEASES)
def test_files_pass_their_checks_and_broken_ones_fail(release: str,
                                                      validators: Validators) -> None:
    plan = plan_of(release=release)
    validators.prepare(release, plan)  # the members' users: php-fpm -t resolves them
    pool = file_of(plan, pool_file(PHP[release], "alpha"))
    ini = file_of(plan, f"/etc/php/{PHP[release]}/fpm/conf.d/90-selfhost.ini")
    cnf = file_of(plan, MARIADB_CNF)
    cases = [
        (pool, [pool.content.replace("pm = ondemand", "pm = whenever"),
                pool.content.replace("user = alpha", "user = nosuchmember"),
                pool.content + "no_such_directive = 1\n"]),
        (ini, [ini.content + "opcache.restrict_api = \"unterminated\n"]),
        (cnf, [cnf.content + "no-such-variable = 1\n", "[mysqld\nbind-address = x\n"]),
    ]
    with_mail = model()
    with_mail["services"]["mail"] = {"domains": [{"name": "asso.example"}]}
    mail_pool = file_of(plan_of(with_mail, release), pool_file(PHP[release], "alpha"))
    assert "mail.add_x_header" in mail_pool.content
    ok = validators.check(release, mail_pool.path, mail_pool.content, mail_pool.validate)
    assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()
    for f, broken in cases:
        ok = validators.check(release, f.path, f.content, f.validate)
        assert ok.returncode == 0, (f.path, (ok.stdout + ok.stderr).decode())
        for text in broken:
            res = validators.check(release, f.path, text, f.validate)
            assert res.returncode != 0, (f.path, text[-80:])
