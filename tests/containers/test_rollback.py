"""A managed file that passes its validator but makes its unit fail after the reload is put
back (issue 15), on real Debian containers: Caddy, a Caddyfile that ``caddy validate``
accepts but whose new site listens on a port another program already holds.

Run with ``SELFHOST_CONTAINER_TESTS=1 .venv/bin/pytest tests/containers -v`` (or
``scripts/test faults``)."""

from __future__ import annotations

import re
import time

import pytest
from faultlib import REPO, Start, deploy, podman, sh
from test_faults import RELEASES, _one_line

MODEL = f"selfhost_config={REPO}/examples/home.yaml"
EXTRA = "tests/containers/deploy_caddy_extra.py"
CADDYFILE = "/etc/caddy/Caddyfile"
MARKER = "/var/lib/selfhost/pending/reload-caddy.service"
SITE = ("curl -sk --max-time 5 --resolve www.home.arpa:443:127.0.0.1 "
        "https://www.home.arpa/ | grep -c '<title>nas.home.arpa</title>'")
HOLD_PORT = ("import socket, time\n"
             "s = socket.socket(); s.bind(('0.0.0.0', 8081)); s.listen()\n"
             "open('/run/r15-port-held', 'w').close()\n"
             "time.sleep(600)\n")


@pytest.mark.parametrize("release", RELEASES)
def test_a_caddyfile_that_breaks_the_reload_is_put_back(container: Start, release: str) -> None:
    name = container(release, "--cap-add=NET_ADMIN", "--cap-add=NET_RAW")
    t0 = time.monotonic()
    first = deploy(name, "--data", MODEL)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    t_first = time.monotonic() - t0
    assert sh(name, SITE).stdout.strip() == "1"
    before = sh(name, f"sha1sum {CADDYFILE}").stdout

    # Another program holds port 8081; the next deploy's Caddyfile adds a site on it.
    sh(name, f"cat > /root/hold.py <<'EOF'\n{HOLD_PORT}EOF")
    podman("exec", "--detach", name, "python3", "/root/hold.py")
    sh(name, "for i in $(seq 50); do [ -e /run/r15-port-held ] && break; sleep 0.2; done; "
             "test -e /run/r15-port-held")
    t0 = time.monotonic()
    res = deploy(name, "--data", MODEL, "--data", "caddy_extra_port=8081", deploy_file=EXTRA)
    t_failed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    line = _one_line(out, "selfhost: caddy.service failed")
    # Caddy 2.6 never says READY=1 after a failed reload (caddyserver/caddy#7385): the unit
    # is stuck "reloading", and restarting it with the previous file is what brings it back.
    assert re.search(
        f"caddy.service failed after its reload with the new {CADDYFILE}: the previous "
        f"version of {CADDYFILE} was put back and caddy.service (reloaded again|restarted "
        r"\(it was stuck reloading\)) \(now active\); the deploy stops here. The journal of "
        "caddy.service says:", line), line
    journal = _one_line(out, "address already in use")
    assert "selfhost:   " in journal and "listen tcp :8081" in journal

    # The previous file is back, the previous site still served, nothing left half-done;
    # the reload stays owed (the next deploy retries).
    assert sh(name, f"sha1sum {CADDYFILE}").stdout == before
    assert sh(name, "systemctl is-active caddy").stdout.strip() == "active"
    assert sh(name, SITE).stdout.strip() == "1"
    assert sh(name, f"test -e {MARKER} && echo owed").stdout.strip() == "owed"
    left = sh(name, "find /etc /var/lib/selfhost/prev -name '*.selfhost-new' -o -type f "
                    "-path '/var/lib/selfhost/prev/*' | wc -l").stdout.strip()
    assert left == "0", left

    # Once the port is free, the same deploy goes through: file replaced, both sites served.
    sh(name, "pkill -f /root/hold.py; sleep 0.5", check=False)
    again = deploy(name, "--data", MODEL, "--data", "caddy_extra_port=8081", deploy_file=EXTRA)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "extra site on 8081" in sh(name, "curl -s --max-time 5 http://127.0.0.1:8081/").stdout
    assert sh(name, SITE).stdout.strip() == "1"
    assert sh(name, f"test -e {MARKER} || echo done").stdout.strip() == "done"
    print(f"{release}: first deploy {t_first:.1f} s, failed deploy {t_failed:.1f} s: "
          f"{line.strip()} | {journal.strip()}")
