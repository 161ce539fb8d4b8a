"""Instant messaging with Prosody, checked with a real XMPP client.

The client is slixmpp (PyPI, in the test extras) on the controller. It reaches each
container's XMPP port (5222) and HTTPS port (443) published on 127.0.0.1, starts TLS and
checks the server's certificate against Caddy's internal CA for the name ``home.arpa`` (the
certificate the web module obtained and exported for Prosody), then logs in with SCRAM, as a
phone or a laptop would.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import re
import socket
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import slixmpp
from slixmpp.exceptions import IqError

DOMAIN = "home.arpa"
ALICE = os.environ.get("XMPP_ALICE_PASSWORD", "molecule: Alice's chat password, 2026!")
BOB = os.environ.get("XMPP_BOB_PASSWORD", "molecule: Bob's chat password, 2026! é")
CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
CERT = f"/etc/selfhost/tls/{DOMAIN}/fullchain.pem"
UPLOAD = "urn:xmpp:http:upload:0"


def podman(*args: str) -> str:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"podman {' '.join(args)}: {res.stderr}"
    return res.stdout


def published(name: str, port: int) -> int:
    return int(podman("port", name, f"{port}/tcp").strip().rsplit(":", 1)[1])


class Server:
    """Where the client reaches one container: its published ports and its CA."""

    def __init__(self, name: str, ca: Path) -> None:
        self.name = name
        self.c2s = published(name, 5222)
        self.https = published(name, 443)
        self.ca = ca


@pytest.fixture(scope="module")
def server(host: Any, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The container, once Prosody serves the exported certificate (the web module's export
    timer runs 30 s after the first deploy and reloads Prosody)."""
    name = str(host.backend.name)
    deadline = time.monotonic() + 90
    while host.run(f"test -s {CERT} && test -s {CA}").rc != 0:
        assert time.monotonic() < deadline, host.run(
            "journalctl -u selfhost-cert-export --no-pager | tail -5").stdout
        time.sleep(1)
    ca = tmp_path_factory.mktemp(name) / "ca.crt"
    ca.write_text(podman("exec", name, "cat", CA))
    srv = Server(name, ca)
    # Prosody reloads the certificate right after the export: wait until STARTTLS works.
    error = ""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", srv.c2s), timeout=5) as s:
                _stream_start(s)
                s.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                assert b"<proceed" in _read_until(s, b"proceed")
                ctx = ssl.create_default_context(cafile=str(ca))
                ctx.wrap_socket(s, server_hostname=DOMAIN).close()
                break
        except (OSError, ssl.SSLError, AssertionError) as exc:
            error = repr(exc)
            assert time.monotonic() < deadline, f"no STARTTLS with a valid certificate: {error}"
            time.sleep(1)
    return srv


def _read_until(s: socket.socket, marker: bytes, limit: float = 10) -> bytes:
    data = b""
    end = time.monotonic() + limit
    while marker not in data and time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _stream_start(s: socket.socket) -> bytes:
    s.settimeout(10)
    s.sendall(b"<?xml version='1.0'?><stream:stream to='" + DOMAIN.encode() + b"' "
              b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
              b"version='1.0'>")
    return _read_until(s, b"</stream:features>")


class Client(slixmpp.ClientXMPP):  # type: ignore[misc]
    """A client that starts TLS (never direct TLS, never plaintext) and trusts only the
    test server's CA; ``outcome`` says how the login ended."""

    def __init__(self, jid: str, password: str, ca: Path) -> None:
        super().__init__(jid, password)
        self.ca_certs = ca
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        self.register_plugin("xep_0030")
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.room_inbox: asyncio.Queue[Any] = asyncio.Queue()
        for event, result in (("session_start", "ok"), ("failed_all_auth", "auth-failed"),
                              ("ssl_invalid_chain", "bad-certificate"),
                              ("connection_failed", "no-connection"),
                              ("disconnected", "disconnected")):
            self.add_event_handler(event, self._settle(result))
        self.add_event_handler("message", lambda m: self.inbox.put_nowait(m))
        self.add_event_handler("message", self._groupchat)

    def _groupchat(self, msg: Any) -> None:
        if msg["type"] == "groupchat":
            self.room_inbox.put_nowait(msg)

    def _settle(self, result: str) -> Any:
        def handler(_: Any) -> None:
            if not self.outcome.done():
                self.outcome.set_result(result)
        return handler


async def login(server: Server, jid: str, password: str) -> Client:
    client = Client(jid, password, server.ca)
    client.connect("127.0.0.1", server.c2s)
    try:
        result = await asyncio.wait_for(client.outcome, 30)
    except TimeoutError:
        result = "timeout"
    if result != "ok":
        client.disconnect()
        raise LoginFailed(result)
    client.send_presence()
    return client


class LoginFailed(Exception):
    pass


async def logout(*clients: Client) -> None:
    for c in clients:
        c.disconnect()
    await asyncio.sleep(0.2)


def test_prosody_runs_with_only_the_model_ports(host: Any) -> None:
    assert host.service("prosody").is_running and host.service("prosody").is_enabled
    listening = host.check_output("ss -Hltn")
    assert re.search(r"[*:\]0.]:5222\s", listening)
    assert "127.0.0.1:5280" in listening and not re.search(r"[*\]0]:5280\s", listening)
    assert ":5269" not in listening  # federation is off
    assert ":5281" not in listening  # no HTTPS of Prosody's own: the web server's
    rules = host.check_output("nft list table inet selfhost")
    assert "tcp dport 5222 accept" in rules and "5269" not in rules and "5280" not in rules


def test_two_accounts_log_in_over_tls_and_exchange_a_message(server: Server) -> None:
    async def scenario() -> str:
        alice = await login(server, f"alice@{DOMAIN}", ALICE)
        bob = await login(server, f"bob@{DOMAIN}", BOB)
        await asyncio.sleep(0.5)  # bob's presence reaches the server
        alice.send_message(mto=f"bob@{DOMAIN}", mbody="Dinner at eight?", mtype="chat")
        msg = await asyncio.wait_for(bob.inbox.get(), 15)
        bob.send_message(mto=f"alice@{DOMAIN}", mbody="Yes!", mtype="chat")
        answer = await asyncio.wait_for(alice.inbox.get(), 15)
        await logout(alice, bob)
        return f"{msg['from'].bare}: {msg['body']} / {answer['from'].bare}: {answer['body']}"

    assert asyncio.run(scenario()) == (f"alice@{DOMAIN}: Dinner at eight? / "
                                      f"bob@{DOMAIN}: Yes!")


def test_a_wrong_password_is_refused_and_counted_by_fail2ban(host: Any, server: Server) -> None:
    async def attempt(jid: str, password: str) -> str:
        try:
            c = await login(server, jid, password)
        except LoginFailed as exc:
            return str(exc)
        await logout(c)
        return "ok"

    before = _failed(host)
    assert asyncio.run(attempt(f"alice@{DOMAIN}", BOB)) == "auth-failed"
    assert asyncio.run(attempt(f"mallory@{DOMAIN}", ALICE)) == "auth-failed"
    log = host.check_output("journalctl -u prosody --no-pager -n 50")
    assert f"Failed authentication attempt (not-authorized) for user alice@{DOMAIN}" in log
    deadline = time.monotonic() + 20
    while _failed(host) < before + 2:
        assert time.monotonic() < deadline, host.check_output("fail2ban-client status prosody")
        time.sleep(1)


def _failed(host: Any) -> int:
    out = host.check_output("fail2ban-client status prosody")
    m = re.search(r"Total failed:\s+(\d+)", out)
    assert m, out
    return int(m.group(1))


def test_no_login_without_tls(server: Server) -> None:
    """Before STARTTLS the server offers no way to log in, and refuses a PLAIN login (with
    the right password) outright."""
    with socket.create_connection(("127.0.0.1", server.c2s), timeout=10) as s:
        features = _stream_start(s).decode()
        assert "<starttls" in features and "<required" in features, features
        assert "<mechanisms" not in features, features
        token = base64.b64encode(f"\0alice\0{ALICE}".encode()).decode()
        s.sendall(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}"
                  "</auth>".encode())
        reply = _read_until(s, b">", 10).decode()
        assert "<success" not in reply, reply
        assert "encryption-required" in reply or "</stream:stream>" in reply, reply


MUC_USER = "{http://jabber.org/protocol/muc#user}"


async def join(client: Client, room: slixmpp.JID, nick: str) -> set[str]:
    """Join ``room`` as ``nick`` (as a client does: the join presence, then the room's
    presence of ourselves, status 110); a room this join created (status 201) is locked until
    its owner accepts the default configuration (an "instant room"). Returns the status
    codes."""
    me = f"{room.bare}/{nick}"
    joined: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()

    def on_presence(pres: Any) -> None:
        x = pres.xml.find(f"{MUC_USER}x")
        if str(pres["from"]) != me or x is None or joined.done():
            return
        codes = {st.get("code", "") for st in x.findall(f"{MUC_USER}status")}
        if pres["type"] == "error":
            joined.set_exception(AssertionError(str(pres)))
        elif "110" in codes:
            joined.set_result(codes)

    client.add_event_handler("presence", on_presence)
    pres = client.make_presence(pto=me)
    pres.append(ET.Element("{http://jabber.org/protocol/muc}x"))
    pres.send()
    codes = await asyncio.wait_for(joined, 20)
    client.del_event_handler("presence", on_presence)
    if "201" in codes:
        iq = client.make_iq_set(ito=room.bare)
        query = ET.Element("{http://jabber.org/protocol/muc#owner}query")
        query.append(ET.Element("{jabber:x:data}x", {"type": "submit"}))
        iq.append(query)
        await iq.send(timeout=15)
    return codes


def test_group_chat(server: Server) -> None:
    """Alice creates a room on conference.home.arpa, Bob joins it and reads her message."""
    room = slixmpp.JID(f"family-{int(time.time())}@conference.{DOMAIN}")

    async def scenario() -> tuple[set[str], set[str], str]:
        alice = await login(server, f"alice@{DOMAIN}", ALICE)
        bob = await login(server, f"bob@{DOMAIN}", BOB)
        created = await join(alice, room, "alice")
        joined = await join(bob, room, "bob")
        alice.send_message(mto=room, mbody="Hello family", mtype="groupchat")
        while True:
            msg = await asyncio.wait_for(bob.room_inbox.get(), 15)
            if msg["body"] == "Hello family":
                break
        await logout(alice, bob)
        return created, joined, str(msg["from"])

    created, joined, sender = asyncio.run(scenario())
    assert "201" in created and "201" not in joined
    assert sender == f"{room.bare}/alice"


def test_file_sharing_with_a_size_limit(server: Server) -> None:
    """A slot from upload.home.arpa, the file PUT and read back over the web server's HTTPS,
    and a file over the model's 20 MB refused."""
    data = os.urandom(4096)

    async def slots() -> tuple[dict[str, str], str]:
        alice = await login(server, f"alice@{DOMAIN}", ALICE)
        small = await _slot(alice, "photo.jpg", len(data))
        try:
            await _slot(alice, "film.mkv", 21_000_000)
            big = "granted"
        except IqError as exc:
            big = exc.iq.xml.find("{jabber:client}error")
            big = ET.tostring(big).decode() if big is not None else "error"
        await logout(alice)
        return small, big

    small, big = asyncio.run(slots())
    assert "file-too-large" in big, big
    assert small["put"].startswith(f"https://upload.{DOMAIN}/"), small
    status, _ = _https(server, "PUT", small["put"], data, small["headers"])
    assert status == 201
    status, body = _https(server, "GET", small["get"])
    assert status == 200 and body == data


async def _slot(client: Client, name: str, size: int) -> dict[str, Any]:
    iq = client.make_iq_get(ito=f"upload.{DOMAIN}")
    iq.append(ET.Element(f"{{{UPLOAD}}}request",
                         {"filename": name, "size": str(size), "content-type":
                          "application/octet-stream"}))
    result = await iq.send(timeout=15)
    slot = result.xml.find(f"{{{UPLOAD}}}slot")
    put = slot.find(f"{{{UPLOAD}}}put")
    return {"put": put.get("url"), "get": slot.find(f"{{{UPLOAD}}}get").get("url"),
            "headers": {h.get("name"): h.text or "" for h in put.findall(f"{{{UPLOAD}}}header")}}


def _https(server: Server, method: str, url: str, body: bytes | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A request to the URL's host name, sent to the container's published 443."""
    m = re.match(r"https://([^/]+)(/.*)$", url)
    assert m, url
    name, path = m.groups()
    ctx = ssl.create_default_context(cafile=str(server.ca))
    raw = socket.create_connection(("127.0.0.1", server.https), timeout=15)
    conn = http.client.HTTPSConnection(name, context=ctx, timeout=15)
    conn.sock = ctx.wrap_socket(raw, server_hostname=name)
    conn.request(method, path, body=body, headers={
        **(headers or {}), "Content-Type": "application/octet-stream"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_no_password_on_the_server(host: Any) -> None:
    """Only SCRAM keys are stored: the passwords are nowhere in the configuration, the data,
    the logs or the journal. (Each password goes to grep on its standard input, never in a
    command line that an audit log could record.)"""
    name = str(host.backend.name)
    script = ("IFS= read -r S; grep -rlF -- \"$S\" /etc /var/lib/prosody /var/log /root /tmp "
              "2>/dev/null; journalctl --no-pager | grep -F -- \"$S\" | head -3; true")
    for secret in (ALICE, BOB):
        res = subprocess.run(["podman", "exec", "-i", name, "sh", "-c", script],
                             input=secret + "\n", capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and res.stdout.strip() == "", res.stdout + res.stderr
    account = host.file(f"/var/lib/prosody/{DOMAIN.replace('.', '%2e')}/accounts/alice.dat")
    assert account.user == "prosody" and account.mode == 0o640
    assert re.search(r'\["stored_key"\] = "[0-9a-f]{40}"', account.content_string)
    assert "password" not in account.content_string


def test_backup_stops_prosody_and_holds_its_data(host: Any, server: Server) -> None:
    """Runs last. The nightly backup's service (the real timer's) stops Prosody for the copy
    (its archives are appended in place), starts it again, and the snapshot holds the
    accounts; a client logs in again afterwards."""
    def started() -> str:
        return str(host.check_output("systemctl show prosody -p ActiveEnterTimestampMonotonic"))

    before = started()
    res = host.run("systemctl start selfhost-backup-usb.service")
    assert res.rc == 0, res.stderr + host.run(
        "journalctl -u selfhost-backup-usb.service -n 30 --no-pager").stdout
    assert host.service("prosody").is_running and started() != before
    listing = host.check_output("/usr/local/sbin/selfhost-backup restic usb ls latest")
    assert f"/var/lib/prosody/{DOMAIN.replace('.', '%2e')}/accounts/alice.dat" in listing

    async def again() -> None:
        await logout(await login(server, f"alice@{DOMAIN}", ALICE))

    deadline = time.monotonic() + 30
    while True:  # Prosody takes a moment to listen again
        try:
            asyncio.run(again())
            break
        except LoginFailed:
            assert time.monotonic() < deadline
            time.sleep(1)
