"""Members' calendar login: on a host with Radicale, the association asks the radicale module
for one login per member with a password (``CalendarAccount``: the member's name and single
password), which joins Radicale's own users in Caddy's basic auth (bcrypt); a member named
like one of Radicale's own users is an error at the member's name; a Radicale with no user at
all still fails validation."""

from __future__ import annotations

import base64
import copy
import ctypes
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfhost.backend.pyinfra import _secret_value
from selfhost.compile import Target, compile_fleet
from selfhost.compose.keys import FakeKeyStore
from selfhost.compose.requests import CalendarAccount, VirtualHost
from selfhost.compose.route import route_host
from selfhost.config import ConfigError, load_server_text
from selfhost.models.fleet import Fleet
from selfhost.models.passwords import _CRYPT_DATA_SIZE, _libcrypt
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "association.yaml"
CADDYFILE = "/etc/caddy/Caddyfile"
DAV = "dav.asso.example"
PASSWORDS = {"ASSO_ALPHA_PASSWORD": "unit test: alpha's login",
             "ASSO_BRAVO_PASSWORD": "unit test: bravo's login",
             "ASSO_CHARLIE_PASSWORD": "unit test: charlie's login"}


def data() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))


def requests_of(d: dict[str, Any]) -> dict[type, list[Any]]:
    server = validated(d)
    fleet = Fleet.of(server)
    [host] = fleet.hosts
    return route_host(fleet, host, server.modules()).requests


def caddyfile(d: dict[str, Any]) -> Any:
    [plan] = compile_fleet(Fleet.of(validated(d)), {"asso": Target(
        release="bookworm", in_container=True)}).values()
    return next(s.file for s in plan.steps
                if type(s).__name__ == "File" and s.file.path == CADDYFILE)


def dav_block(content: str) -> list[str]:
    """The lines of the Caddyfile's site block for the calendars' host name."""
    lines = content.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(DAV))
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return lines[start:end]


def crypt_check(password: str, stored: str) -> bool:
    """Whether ``stored`` (a bcrypt hash) is the hash of ``password``: crypt(3) with the
    hash as its setting gives the hash back."""
    lib = _libcrypt()
    data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    raw = lib.crypt_rn(password.encode(), stored.encode(), data, _CRYPT_DATA_SIZE)
    return bool(raw) and raw.decode() == stored


def test_each_member_with_a_password_asks_for_a_calendar_login() -> None:
    accounts = requests_of(data())[CalendarAccount]
    assert [(a.name, a.password.env, a.owner, a.origin) for a in accounts] == [
        ("alpha", "ASSO_ALPHA_PASSWORD", "member alpha", "services.association.members.0.name"),
        ("bravo", "ASSO_BRAVO_PASSWORD", "member bravo", "services.association.members.1.name"),
        ("charlie", "ASSO_CHARLIE_PASSWORD", "member charlie",
         "services.association.members.2.name")]
    [vhost] = [v for v in requests_of(data())[VirtualHost] if v.host == DAV]
    assert [(u.name, u.password.env) for u in vhost.auth] == [
        ("alpha", "ASSO_ALPHA_PASSWORD"), ("bravo", "ASSO_BRAVO_PASSWORD"),
        ("charlie", "ASSO_CHARLIE_PASSWORD")]


def test_caddy_checks_the_members_passwords_with_bcrypt(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    for k, v in PASSWORDS.items():
        monkeypatch.setenv(k, v)
    f = caddyfile(data())
    block = dav_block(f.content)
    auth = block[block.index("\tbasicauth {") + 1:block.index("\tbasicauth {") + 4]
    assert [line.split()[0] for line in auth] == ["alpha", "bravo", "charlie"], block
    assert "\t\theader_up X-Remote-User {http.auth.user.id}" in block
    keys = FakeKeyStore()
    for line, env in zip(auth, PASSWORDS, strict=True):
        n = int(line.split()[1].removeprefix("@@selfhost-secret-").removesuffix("@@"))
        piece = f.secrets[n]
        assert piece.ref.env == env
        assert piece.transform == "bcrypt-base64"
        assert piece.context == f"asso.asso.example/{DAV}/{line.split()[0]}"
        stored = base64.b64decode(_secret_value(piece, keys)).decode()
        assert stored.startswith("$2b$10$"), stored
        assert crypt_check(PASSWORDS[env], stored)
        assert not crypt_check(PASSWORDS[env] + "x", stored)


def test_radicale_users_and_members_log_in_side_by_side() -> None:
    d = data()
    d["services"]["radicale"]["users"] = [{"name": "board", "password": {"env": "DAV_BOARD"}}]
    [vhost] = [v for v in requests_of(d)[VirtualHost] if v.host == DAV]
    assert [u.name for u in vhost.auth] == ["board", "alpha", "bravo", "charlie"]


def test_a_member_named_like_a_radicale_user_is_an_error_at_the_member() -> None:
    text = EXAMPLE.read_text().replace(
        "    zone: internet                   # (no users of Radicale's own here)\n",
        "    zone: internet\n    users:\n      - name: bravo\n        password: {env: DAV_B}\n")
    lines = text.splitlines()
    member = next(i for i, line in enumerate(lines) if line.strip() == "- name: bravo"
                  and "email" in lines[i + 1]) + 1
    own = next(i for i, line in enumerate(lines) if line.strip() == "- name: bravo") + 1
    assert own < member
    with pytest.raises(ConfigError) as err:
        load_server_text(text, "association.yaml")
    assert (f"association.yaml:{member}:") in str(err.value), str(err.value)
    assert ("services.association.members.1.name: calendar login bravo (member bravo) is "
            "already one of radicale's users (services.radicale.users.0.name) (the other side: "
            f"association.yaml:{own}:") in str(err.value), str(err.value)


def test_an_empty_radicale_still_fails_validation() -> None:
    d = data()
    for m in d["services"]["association"]["members"]:
        del m["password"], m["mailboxes"]
        m.pop("aliases", None)
    with pytest.raises(ModelError) as err:
        validated(d)
    assert ("services.radicale.users: radicale has no users and no module asks for accounts"
            in str(err.value)), str(err.value)
    with pytest.raises(ModelError, match="radicale has no users"):
        validated({"hostname": "h", "domain": "home.arpa", "services": {"radicale": {}},
                   "admins": d["admins"]})


@pytest.mark.parametrize("radicale", [None, {"enabled": False, "users": []}])
def test_no_calendar_login_without_the_radicale_service(radicale: Any) -> None:
    d = data()
    if radicale is None:
        del d["services"]["radicale"]
    else:
        d["services"]["radicale"] = radicale
    reqs = requests_of(d)
    assert CalendarAccount not in reqs
    assert not [v for v in reqs[VirtualHost] if v.host == DAV]
