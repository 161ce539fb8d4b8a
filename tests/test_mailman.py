"""Mailing lists (Mailman 3): model rules at their model paths, what the lists module asks of
the mail server, the rendered mailman.cfg, lists file and Postfix routing/counting, and, in a
Debian container of each release, mailman.cfg checked by Mailman itself (a broken one
refused) and the list script compiled by Python."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from validators import Validators

from selfhost.compile import Target, compile_fleet
from selfhost.compose.requests import BackupSource, ListAddresses, LoopbackGuard, MailingList
from selfhost.config import load_fleet
from selfhost.models.fleet import Fleet
from selfhost.services.mailman import APPLY, CONFIG, LISTS_JSON, list_addresses
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "association.yaml"
LIST_TRANSPORT = "/etc/postfix/selfhost-list-transport"


def example() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return copy.deepcopy(data)


def plan_of(data: dict[str, Any] | None = None, release: str = "bookworm") -> Any:
    fleet = load_fleet(EXAMPLE) if data is None else Fleet.of(validated(data))
    [plan] = compile_fleet(fleet, {"asso": Target(release=release,  # type: ignore[arg-type]
                                                  in_container=True)}).values()
    return plan


def packages(plan: Any) -> set[str]:
    return {n for s in plan.steps if type(s).__name__ == "Packages" for n in s.names}


def file_of(plan: Any, path: str) -> Any:
    return next(s.file for s in plan.steps if type(s).__name__ == "File" and s.file.path == path)


def routed(data: dict[str, Any] | None = None) -> Any:
    from selfhost.compose.route import route_host

    server = validated(data or example())
    fleet = Fleet.of(server)
    [host] = fleet.hosts
    return route_host(fleet, host, server.modules())


def test_a_member_list_becomes_a_list_request_and_mail_routing() -> None:
    r = routed()
    [ml] = r.requests[MailingList]
    assert ml == MailingList("alpha-news@asso.example", ("contact@alpha.example",),
                             description="List of member alpha",
                             origin="services.association.members.0.lists.0")
    [route] = r.requests[ListAddresses]
    assert route.addresses == list_addresses("alpha-news@asso.example")
    assert "alpha-news-request@asso.example" in route.addresses
    assert "alpha-news-join@asso.example" in route.addresses
    guards = {g.port: g.users for g in r.requests[LoopbackGuard]}
    # Only Postfix hands mail to Mailman (and Mailman's runner checks its own port).
    assert guards[8024] == ("postfix", "list", "root")
    assert guards[10027] == ("list", "root")  # only Mailman sends on its counted port


def test_no_lists_no_mailman() -> None:
    data = example()
    del data["services"]["association"]["members"][0]["lists"]
    plan = plan_of(data)
    assert "mailman3" not in packages(plan)
    assert LIST_TRANSPORT not in plan.files()
    assert "10027" not in file_of(plan, "/etc/postfix/master.cf").content
    assert "transport_maps" not in file_of(plan, "/etc/postfix/main.cf").content


def test_rendered_files() -> None:
    plan = plan_of()
    assert "mailman3" in packages(plan)
    cfg = file_of(plan, CONFIG)
    assert (cfg.mode, cfg.owner, cfg.group) == ("0640", "root", "list")
    for line in ("[runner.rest]\nstart: no\n",
                 "incoming: mailman.mta.null.NullMTA\n",
                 "lmtp_host: 127.0.0.1\nlmtp_port: 8024\n",
                 "smtp_host: 127.0.0.1\nsmtp_port: 10027\n",
                 "verp_personalized_deliveries: no\n",
                 "[archiver.prototype]\nenable: yes\n"):
        assert line in cfg.content, line
    assert "admin_pass" not in cfg.content
    lists = json.loads(file_of(plan, LISTS_JSON).content)
    assert lists == {"lists": [{
        "address": "alpha-news@asso.example", "archive": "private",
        "description": "List of member alpha", "nonmembers": "hold",
        "owners": ["contact@alpha.example"], "posting": "members", "subscription": "confirm"}]}
    transport = file_of(plan, LIST_TRANSPORT).content.splitlines()[1:]
    assert transport == [f"alpha-news{s}@asso.example lmtp:[127.0.0.1]:8024" for s in (
        "", "-bounces", "-confirm", "-join", "-leave", "-owner", "-request", "-subscribe",
        "-unsubscribe")]
    main = file_of(plan, "/etc/postfix/main.cf").content
    assert f"transport_maps = texthash:{LIST_TRANSPORT}" in main
    assert (f"virtual_mailbox_maps = texthash:/etc/postfix/selfhost-mailboxes, "
            f"texthash:{LIST_TRANSPORT}") in main
    master = file_of(plan, "/etc/postfix/master.cf").content
    block = master[master.index("127.0.0.1:10027 inet"):].split("\n# ")[0]
    assert "-o syslog_name=postfix/lists" in block
    assert "smtpd_end_of_data_restrictions = check_policy_service inet:127.0.0.1:10040" in block
    assert "check_policy_service unix:private/selfhost-recipients" in block
    assert "smtpd_client_restrictions=permit_mynetworks,reject" in block
    postfwd = file_of(plan, "/etc/postfix/postfwd.cf").content
    # The example's limits (10 a minute) count each list's mail.
    assert ("id=SELFHOST_LIST_MINUTE_10027; protocol_state==END-OF-MESSAGE; "
            "server_port==10027; sender=~/./; action=rate(sender/10/60/HOLD ") in postfwd
    assert "id=SELFHOST_LIST_DAY_10027;" in postfwd
    run = next(s.command for s in plan.steps if type(s).__name__ == "Run"
               and s.command.name.startswith("mailman: lists"))
    assert run.command == (f"cd / && runuser -u list -- python3 {APPLY} {LISTS_JSON}")
    assert run.unless == (f"cd / && runuser -u list -- python3 {APPLY} --check {LISTS_JSON} "
                          ">/dev/null")
    assert {(h.kind, h.target) for h in plan.health} >= {
        ("unit", "mailman3.service"), ("tcp", "127.0.0.1:8024"), ("tcp", "127.0.0.1:10027")}
    sources = {b.path: b.before for b in routed().requests[BackupSource]}
    assert "/var/lib/mailman3" in sources
    assert ".backup(" in (sources["/var/backups/selfhost/mailman"] or "")


def test_lists_declared_under_services() -> None:
    data = example()
    data["services"]["lists"] = {"lists": [{"address": "board@asso.example",
                                            "owners": ["anna@asso.example"],
                                            "posting": "moderated", "archive": "never"}]}
    lists = json.loads(file_of(plan_of(data), LISTS_JSON).content)["lists"]
    assert [(x["address"], x["posting"], x["archive"]) for x in lists] == [
        ("alpha-news@asso.example", "members", "private"),
        ("board@asso.example", "moderated", "never")]


def _with_list(address: str, **extra: Any) -> dict[str, Any]:
    data = example()
    data["services"]["association"]["members"][1]["lists"] = [{"address": address, **extra}]
    return data


@pytest.mark.parametrize("data,loc,message", [
    (_with_list("bravo@elsewhere.example"),
     "services.association.members.1.lists.0.address",
     "elsewhere.example is not one of the mail domains (asso.example)"),
    (_with_list("anna@asso.example"),
     "services.association.members.1.lists.0.address",
     "needs the address anna@asso.example, which is already a mailbox"),
    (_with_list("alpha-news@asso.example"),
     "services.association.members.1.lists.0",
     "mailing list alpha-news@asso.example is requested by both "
     "services.association.members.0.lists.0 and services.association.members.1.lists.0"),
])
def test_model_errors_point_at_their_model_path(data: dict[str, Any], loc: str,
                                                 message: str) -> None:
    with pytest.raises(ModelError) as err:
        validated(data)
    assert f"{loc}: " in str(err.value) and message in str(err.value), str(err.value)


def test_a_list_clashing_with_a_list_command_address() -> None:
    data = _with_list("alpha-news-request@asso.example")
    with pytest.raises(ModelError) as err:
        validated(data)
    assert ("services.association.members.0.lists.0.address: list alpha-news@asso.example "
            "needs the address alpha-news-request@asso.example, which is already an address "
            "of list alpha-news-request@asso.example") in str(err.value)


def test_an_alias_clash() -> None:
    data = example()
    data["services"]["mail"]["aliases"] = [{"address": "alpha-news-owner@asso.example",
                                            "to": ["anna@asso.example"]}]
    with pytest.raises(ModelError) as err:
        validated(data)
    assert ("services.association.members.0.lists.0.address: list alpha-news@asso.example "
            "needs the address alpha-news-owner@asso.example, which is already an alias"
            ) in str(err.value)


def test_lists_without_the_mail_service() -> None:
    data = example()
    del data["services"]["mail"]
    with pytest.raises(ModelError) as err:
        validated(data)
    assert ("services.association.members.0.lists.0: mailing list alpha-news@asso.example "
            "needs the mail service (services.mail)") in str(err.value)
    data["services"]["lists"] = {"lists": [{"address": "x@asso.example", "owners": ["a@b.c"]},
                                           {"address": "x@asso.example", "owners": ["a@b.c"]}]}
    with pytest.raises(ModelError) as err:
        validated(data)
    assert "services.lists.lists.1.address: list x@asso.example is listed twice" in \
        str(err.value)


@pytest.mark.parametrize("item,message", [
    ({"address": "Not An Address"}, "not a list address"),
    ({"address": "x@asso.example", "posting": "anyone"}, "posting"),
    ({"address": "x@asso.example", "archive": "public"}, "archive"),
])
def test_bad_list_fields(item: dict[str, Any], message: str) -> None:
    data = example()
    data["services"]["association"]["members"][2]["lists"] = [item]
    with pytest.raises(Exception) as err:
        validated(data)
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_mailman_cfg_passes_mailman_and_a_broken_one_fails(release: str,
                                                           validators: Validators) -> None:
    plan = plan_of(release=release)
    cfg = file_of(plan, CONFIG)
    ok = validators.check(release, cfg.path, cfg.content, cfg.validate)
    assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()
    # Mailman loads the file and its database: a syntax error, an unknown layout or database
    # fails (an unknown key or section, or a wrong value, is not seen).
    for broken in (cfg.content.replace("layout: debian", "layout: nosuch"),
                   cfg.content.replace("class: mailman.database.sqlite.SQLiteDatabase",
                                       "class: mailman.database.nosuch.X"),
                   cfg.content.replace("[mta]", "[mta")):
        res = validators.check(release, cfg.path, broken, cfg.validate)
        assert res.returncode != 0, broken[-200:]
    script = file_of(plan, APPLY)
    ok = validators.check(release, script.path, script.content, script.validate)
    assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()
    res = validators.check(release, script.path, script.content + "def (\n", script.validate)
    assert res.returncode != 0
