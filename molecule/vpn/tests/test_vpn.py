"""The VPN with a real WireGuard peer.

The peer is a second container on an internal test network (server .2, peer .3), configured
with what `selfhost vpn-peer` prints for the model's "laptop" (plus its test-only private key,
and the server's test-network address as the endpoint). Both ends run wireguard-go.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "vpn.yaml"
KEY = (REPO / "tests" / "fixtures" / "wireguard" / "laptop.key").read_text().strip()


def podman(*args: str, stdin: str | None = None, check: bool = True,
           timeout: int = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["podman", *args], input=stdin, capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {res.stdout}{res.stderr}")
    return res


def platform(server: str) -> dict[str, Any]:
    platforms = yaml.safe_load((Path(__file__).parents[1] / "molecule.yml").read_text())
    return dict(next(p for p in platforms["platforms"] if p["name"] == server))


@pytest.fixture(scope="module")
def names(host: Any) -> tuple[str, str, str]:
    """(server container, peer container, server's address on the test network)."""
    server = str(host.backend.name)
    return server, f"{server}-client", f"{platform(server)['subnet']}.2"


@pytest.fixture(scope="module")
def tunnel(names: tuple[str, str, str]) -> Any:
    """The peer's tunnel, up with `selfhost vpn-peer`'s configuration."""
    server, client, address = names
    res = subprocess.run([str(REPO / ".venv" / "bin" / "selfhost"), "vpn-peer", str(MODEL),
                          "laptop", "--podman", server, "--no-qr"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    conf = res.stdout
    assert "PublicKey = <" not in conf  # the server's public key was read from the server
    conf = conf.replace("PrivateKey = <this device's private key>", f"PrivateKey = {KEY}")
    conf = conf.replace("Endpoint = home.example.org:", f"Endpoint = {address}:")
    # The key travels on standard input, never in a command line.
    podman("exec", "-i", client, "sh", "-c",
           "umask 077; mkdir -p /etc/wireguard; cat > /etc/wireguard/wg0.conf", stdin=conf)
    podman("exec", client, "sh", "-c", "wg-quick down wg0 >/dev/null 2>&1; wg-quick up wg0",
           timeout=60)
    yield client
    podman("exec", client, "wg-quick", "down", "wg0", check=False)


def test_the_server_runs_the_tunnel_with_a_private_key_that_stays_on_it(host: Any) -> None:
    assert host.service("wg-quick@wg0").is_running and host.service("wg-quick@wg0").is_enabled
    key = host.file("/etc/wireguard/wg0.key")
    assert key.mode == 0o600 and key.user == "root" and len(key.content_string.strip()) == 44
    conf = host.file("/etc/wireguard/wg0.conf")  # made on the server, with the key
    assert conf.mode == 0o600 and conf.user == "root"
    assert "PrivateKey" not in host.file("/etc/wireguard/wg0.conf.selfhost").content_string
    assert "private key: (hidden)" in host.check_output("wg show wg0")
    peers = host.check_output("wg show wg0 peers").split()
    assert len(peers) == 2


def test_handshake_with_a_peer(host: Any, tunnel: str) -> None:
    # Traffic through the tunnel (a TCP connection to the server's VPN address) starts the
    # handshake; the server then reports it for the laptop's key.
    podman("exec", tunnel, "bash", "-c", "timeout 5 bash -c '</dev/tcp/10.8.0.1/443'",
           check=False)
    laptop = (REPO / "tests" / "fixtures" / "wireguard" / "laptop.pub").read_text().strip()
    deadline = time.monotonic() + 30
    stamp = 0
    while time.monotonic() < deadline:
        for line in host.check_output("wg show wg0 latest-handshakes").splitlines():
            key, _, when = line.partition("\t")
            if key == laptop:
                stamp = int(when or 0)
        if stamp:
            break
        time.sleep(1)
    assert stamp > 0


def test_vpn_only_service_answers_through_the_tunnel_only(tunnel: str,
                                                          names: tuple[str, str, str]) -> None:
    _, client, address = names
    inside = podman("exec", client, "curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                    "--max-time", "10", "--resolve", "dav.home.arpa:443:10.8.0.1",
                    "https://dav.home.arpa/", check=False)
    assert inside.stdout == "401"  # the calendars ask for a login: they answered
    outside = podman("exec", client, "curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                     "--max-time", "5", "--resolve", f"dav.home.arpa:443:{address}",
                     "https://dav.home.arpa/", check=False)
    assert outside.stdout in ("000", ""), outside.stdout  # dropped by the firewall


def scan(client: str, address: str) -> tuple[set[int], str]:
    """Every TCP port (1-65535) of ``address`` that nmap (Debian's, in the peer container)
    finds open with full connections, and nmap's grepable report."""
    # Timing for a test network (sub-millisecond round trips, the firewall dropping): about
    # 7 s per scan instead of 45 s with nmap's defaults.
    out = podman("exec", client, "nmap", "-Pn", "-n", "-sT", "-p-", "-T5", "--max-retries",
                 "1", "--min-rate", "20000", "--max-rtt-timeout", "100ms", "-oG", "-",
                 *(["-6"] if ":" in address else []), address, timeout=600).stdout
    ports = set()
    for line in out.splitlines():
        if "Ports:" in line:
            for item in line.split("Ports:", 1)[1].split("\t", 1)[0].split(","):
                fields = item.strip().split("/")
                if len(fields) > 2 and fields[1] == "open":
                    ports.add(int(fields[0]))
    return ports, out


def test_a_port_scan_over_ipv4_and_ipv6_finds_only_ssh(host: Any,
                                                     names: tuple[str, str, str]) -> None:
    """From the peer's network, outside the tunnel, nmap scans all TCP ports of the server
    over IPv4 and IPv6: only SSH (the model's one internet-zone TCP port) is open. Caddy does
    listen on 443 on every address, for the VPN-only calendars: the firewall keeps it closed
    from outside the VPN zone."""
    server, client, address = names
    listening = host.check_output("ss -Hltn 'sport = :443'")
    assert "*:443" in listening or "0.0.0.0:443" in listening or "[::]:443" in listening
    address6 = f"{platform(server)['subnet6']}:2"
    for target in (address, address6):
        ports, report = scan(client, target)
        assert ports == {22}, report
        assert "Host: " in report and "Ports:" in report, report  # the host was scanned
