"""The Syncthing (file sync) module: device IDs as Syncthing makes and checks them, model rules
at their model paths, what it requests of the others, what it renders, and its apply script
run against a stand-in for Syncthing's REST API."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from selfhost.compile import Target, compile_fleet
from selfhost.compose.requests import BackupSource, LoopbackGuard, Port, SystemUser
from selfhost.config import load_fleet
from selfhost.models.fleet import Fleet
from selfhost.services.syncthing import APPLY_SH, check_device_id, device_id_of_cert
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sync.yaml"
IDENTITY = ROOT / "molecule" / "sync" / "identity"
LAPTOP = "MFZWI3D-BONSGYC-YLTMRWG-C43ENR5-QXGZDMM-FZWI3DP-BONSGYY-LTMRWAD"


def model(**sync: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["services"]["sync"].update(copy.deepcopy(sync))
    return data


def plan_of(data: dict[str, Any] | None = None, release: str = "bookworm") -> Any:
    fleet = load_fleet(EXAMPLE) if data is None else Fleet.of(validated(data))
    [plan] = compile_fleet(fleet, {"nas": Target(release=release,  # type: ignore[arg-type]
                                                 in_container=True)}).values()
    return plan


# ------------------------------------------------------------------------------ device IDs


def test_device_ids_of_certificates_are_syncthings() -> None:
    # What `syncthing serve --device-id` printed for these certificates (Debian 13's 1.29.5).
    assert device_id_of_cert((IDENTITY / "a-cert.pem").read_text()) == \
        "6A2URHF-FYHNDCW-OQUXLXK-KJLGJE3-RSIYXRB-CIBPXXT-7RJEJGT-KI5HJQF"
    assert device_id_of_cert((IDENTITY / "b-cert.pem").read_text()) == \
        "OIPTICB-APSB2MJ-AQOODX3-VCLLW3S-5IVLJXQ-D6CWQ4F-THXTNCJ-KY6NRAO"


def test_device_ids_are_checked_and_normalised() -> None:
    assert check_device_id(LAPTOP.lower().replace("-", "")) == LAPTOP
    assert check_device_id(f" {LAPTOP} ") == LAPTOP
    for bad, message in ((LAPTOP[:-1] + "E", "check character"),  # one typo
                         (LAPTOP[:-1], "not a Syncthing device ID"),
                         (LAPTOP.replace("M", "1", 1), "not a Syncthing device ID")):
        with pytest.raises(ValueError, match=message):
            check_device_id(bad)


# ------------------------------------------------------------------------------ model rules


@pytest.mark.parametrize("change,message", [
    (lambda u: u[0]["devices"].append({"name": "tv", "id": LAPTOP[:-1] + "E"}),
     "check character is wrong"),
    (lambda u: u[0]["devices"].append({"name": "laptop", "id": u[1]["devices"][0]["id"]}),
     "device name listed twice: laptop"),
    (lambda u: u[0]["folders"].append({"id": "x", "devices": ["tv"]}),
     "folder x names unknown devices: tv"),
    (lambda u: u[0]["devices"][0].update(addresses=["http://laptop:80"]),
     "an address is 'dynamic'"),
    (lambda u: u[0]["folders"][0].update(path="/srv/../etc"), "an absolute path"),
    (lambda u: u[1].update(name="root"), "is a system account"),
    (lambda u: u[1].update(port=22000), "port 22000 is also user alice's port"),
    (lambda u: u[1].update(gui_port=22000), "gui_port 22000 is also user alice's port"),
    (lambda u: u[1].update(name="alice", port=22005, gui_port=8390), "user alice is listed twice"),
])
def test_bad_models_are_refused(change: Any, message: str) -> None:
    data = model()
    change(data["services"]["sync"]["users"])
    with pytest.raises((ValidationError, ModelError), match=message):
        validated(data)


def test_a_device_without_an_address_warns_only_while_discovery_is_off() -> None:
    from selfhost.compose.module import Env
    from selfhost.models.server import Server

    for discovery, warned in ((False, True), (True, False)):
        server = validated(model(local_discovery=discovery))
        assert isinstance(server, Server)
        sync = server.services.sync
        assert sync is not None
        problems = sync.assertions(Env(server=server, host="nas", fleet=Fleet.of(server)))
        assert [p.loc for p in problems] == ([("services", "sync", "users", 0, "devices", 1,
                                               "addresses")] if warned else [])
        assert all(p.severity == "warning" for p in problems)


# ------------------------------------------------------------------------------ requests


def test_requests_ports_users_guards_and_backups() -> None:
    plan = plan_of()
    ports = {(p.port, p.proto, p.zone) for p in plan.ports if isinstance(p, Port)}
    assert {(22000, "tcp", "lan"), (22000, "udp", "lan"), (22001, "tcp", "lan"),
            (22001, "udp", "lan")} <= ports
    assert 21027 not in {p[0] for p in ports}  # local discovery is off
    data = {d.path for d in plan.data if isinstance(d, BackupSource)}
    assert {"/home/alice/Sync/documents", "/srv/photos/alice", "/srv/sync/carol/Sync/notes",
            "/var/lib/syncthing/alice/key.pem", "/var/lib/syncthing/carol/cert.pem"} <= data
    rules = plan.files()["/etc/nftables.conf"]
    for port in (8384, 8385):
        assert f"tcp dport {port}" in rules
    server = validated(model())
    sync = server.services.sync
    assert sync is not None
    from selfhost.compose.module import Env

    reqs = sync.requests(Env(server=server, host="nas", fleet=Fleet.of(server),
                             path="services.sync"))
    # alice is an admin (her own account); carol gets one without a login.
    assert [r.name for r in reqs if isinstance(r, SystemUser)] == ["carol"]
    assert {(g.port, g.users) for g in reqs if isinstance(g, LoopbackGuard)} == \
        {(8384, ("alice", "root")), (8385, ("carol", "root"))}
    discovery = validated(model(local_discovery=True)).services.sync
    assert discovery is not None
    assert Port(21027, "udp", "lan") in [
        Port(r.port, r.proto, r.zone) for r in discovery.requests(
            Env(server=server, host="nas", fleet=Fleet.of(server))) if isinstance(r, Port)]


# ------------------------------------------------------------------------------ rendered


def test_rendered_model_parts() -> None:
    f = plan_of().files()
    dropin = f["/etc/systemd/system/syncthing@carol.service.d/selfhost.conf"]
    assert "ExecStart=\nExecStart=/usr/bin/syncthing serve --no-browser --no-restart " \
        "--logflags=0 --home=/var/lib/syncthing/carol --gui-address=http://127.0.0.1:8385" \
        in dropin
    # In a container, without the seccomp filters that systemd 257 cannot install there.
    assert "SystemCallArchitectures=\nMemoryDenyWriteExecute=no\n" in dropin
    [vm] = compile_fleet(load_fleet(EXAMPLE), {"nas": Target(in_container=False)}).values()
    assert "SystemCallArchitectures" not in \
        vm.files()["/etc/systemd/system/syncthing@carol.service.d/selfhost.conf"]
    devices = json.loads(f["/etc/selfhost/syncthing/alice/devices.json"])
    assert [(d["name"], d["deviceID"], d["addresses"]) for d in devices] == [
        ("laptop", LAPTOP, ["tcp://laptop.home.arpa:22000"]),
        ("phone", "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2", ["dynamic"])]
    folders = json.loads(f["/etc/selfhost/syncthing/alice/folders.json"])
    assert [(x["id"], x["path"], x["type"], len(x["devices"])) for x in folders] == [
        ("documents", "/home/alice/Sync/documents", "sendreceive", 2),
        ("photos", "/srv/photos/alice", "receiveonly", 1)]
    options = json.loads(f["/etc/selfhost/syncthing/carol/options.json"])
    assert options == {
        "listenAddresses": ["tcp://:22001", "quic://:22001"], "localAnnounceEnabled": False,
        "globalAnnounceEnabled": False, "relaysEnabled": False, "natEnabled": False,
        "stunKeepaliveStartS": 0, "urAccepted": -1, "crashReportingEnabled": False,
        "startBrowser": False}
    on = json.loads(plan_of(model(global_discovery=True, relays=True, local_discovery=True,
                                  nat_traversal=True)).files()[
        "/etc/selfhost/syncthing/alice/options.json"])
    assert on["globalAnnounceEnabled"] and on["localAnnounceEnabled"] and on["relaysEnabled"]
    assert on["natEnabled"] and on["stunKeepaliveStartS"] == 180
    assert on["listenAddresses"][-1].startswith("dynamic+https://relays.syncthing.net/")


def test_the_apply_step_runs_only_when_the_model_part_changes() -> None:
    plan = plan_of()
    runs = {s.command.name: s.command for s in plan.steps if type(s).__name__ == "Run"}
    apply = runs["sync: alice's devices, folders and options, through Syncthing's API"]
    assert apply.unless is None
    assert "/etc/selfhost/syncthing/alice/folders.json" in apply.on_change
    gen = runs["sync: alice's Syncthing device key and first configuration"]
    assert gen.unless == "test -s /var/lib/syncthing/alice/config.xml" and gen.late


def test_an_identity_from_the_model_is_uploaded_as_secret_files() -> None:
    fleet = load_fleet(ROOT / "molecule" / "sync" / "fleet.yaml")
    plans = compile_fleet(fleet, {h: Target(in_container=True) for h in fleet.hosts})
    steps = [s for s in plans["a-bookworm"].steps if type(s).__name__ == "File"
             and s.file.path.startswith("/var/lib/syncthing/alice/")]
    assert {(s.file.path, s.file.secret_file, s.file.mode, s.file.owner) for s in steps} == {
        ("/var/lib/syncthing/alice/cert.pem", str(IDENTITY / "a-cert.pem"), "0600", "alice"),
        ("/var/lib/syncthing/alice/key.pem", str(IDENTITY / "a-key.pem"), "0600", "alice")}
    key = (IDENTITY / "a-key.pem").read_text().splitlines()[1]
    assert key not in json.dumps(plans["a-bookworm"].files())  # never in the plan
    assert "PRIVATE KEY" not in json.dumps(plans["a-bookworm"].files())


# ------------------------------------------------------------------------------ apply script


class FakeSyncthing(BaseHTTPRequestHandler):
    """Syncthing's REST API as the script uses it: the API key checked, bodies recorded, a
    device list refused when Syncthing would refuse it."""

    calls: list[tuple[str, str, str, str]] = []

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        self.calls.append((self.command, self.path, self.headers.get("X-API-Key", ""), body))
        if self.headers.get("X-API-Key") != "k3y":
            self.send_response(403)
        elif "BAD" in body:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'"BAD": device ID invalid: incorrect length\n')
            return
        else:
            self.send_response(200)
        self.end_headers()
        if self.path.endswith("restart-required"):
            self.wfile.write(b'{"requiresRestart": false}')

    do_GET = do_PUT = do_PATCH = _handle

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def api() -> Iterator[int]:
    FakeSyncthing.calls = []
    server = HTTPServer(("127.0.0.1", 0), FakeSyncthing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def run_apply(tmp_path: Path, port: int, devices: str = "[]") -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.fail("curl is needed to run the apply script")
    bin_dir, state, model_dir = tmp_path / "bin", tmp_path / "state", tmp_path / "model"
    for d in (bin_dir, state, model_dir):
        d.mkdir(exist_ok=True)
    (bin_dir / "systemctl").write_text("#!/bin/sh\necho \"$@\" >> \"$LOG\"\n")
    (bin_dir / "systemctl").chmod(0o755)
    (state / "config.xml").write_text("<gui>\n        <apikey>k3y</apikey>\n</gui>\n")
    (model_dir / "devices.json").write_text(devices)
    (model_dir / "folders.json").write_text("[]")
    (model_dir / "options.json").write_text("{}")
    script = tmp_path / "apply.sh"
    script.write_text(APPLY_SH)
    import os

    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "LOG": str(tmp_path / "systemctl.log")}
    return subprocess.run(["sh", str(script), "alice", str(state), str(port), str(model_dir)],
                          capture_output=True, text=True, env=env, timeout=60)


def test_apply_script_puts_each_part_with_the_api_key(tmp_path: Path, api: int) -> None:
    res = run_apply(tmp_path, api, devices='[{"deviceID": "X"}]')
    assert res.returncode == 0, res.stderr
    assert [(m, p, k) for m, p, k, _ in FakeSyncthing.calls] == [
        ("GET", "/rest/system/ping", "k3y"), ("PUT", "/rest/config/devices", "k3y"),
        ("PUT", "/rest/config/folders", "k3y"), ("PATCH", "/rest/config/options", "k3y"),
        ("GET", "/rest/config/restart-required", "k3y")]
    assert FakeSyncthing.calls[1][3] == '[{"deviceID": "X"}]'
    assert (tmp_path / "systemctl.log").read_text() == \
        "daemon-reload\nrestart syncthing@alice.service\n"


def test_apply_script_stops_at_what_syncthing_refuses(tmp_path: Path, api: int) -> None:
    res = run_apply(tmp_path, api, devices='[{"deviceID": "BAD"}]')
    assert res.returncode == 1
    assert "Syncthing refused" in res.stderr and "device ID invalid" in res.stderr
    assert [p for _, p, _, _ in FakeSyncthing.calls] == ["/rest/system/ping",
                                                         "/rest/config/devices"]
