"""The members' sites are watched (examples/association.yaml): a fail2ban jail bans a client
over the plan's POST limit, and a timer alerts on per-site request and bandwidth spikes read
from Caddy's JSON access logs."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from selfhost.compile import Target, compile_fleet
from selfhost.models.fleet import Fleet
from selfhost.services import web
from selfhost.validation import validated

ROOT = Path(__file__).resolve().parent.parent


def model() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "examples" / "association.yaml").read_text()))


def files(data: dict[str, Any]) -> dict[str, str]:
    server = validated(data)
    [plan] = compile_fleet(Fleet.of(server),
                           {server.hostname: Target(release="trixie", in_container=True)}
                           ).values()
    return dict(plan.files())


def test_one_post_jail_per_limit_over_the_members_logs() -> None:
    data = model()
    data["services"]["association"]["plans"]["small"] = {"post_per_minute": 5}
    f = files(data)
    jails = f["/etc/fail2ban/jail.local"]
    php = jails.split("[caddy-post-20-60]\n")[1].split("\n\n")[0]
    assert php.splitlines() == [
        "enabled = true", "port = 80,443", "filter = selfhost-caddy-post",
        "backend = auto", "logpath = /var/log/caddy/alpha.asso.example.log",
        "          /var/log/caddy/bravo.example.log", "maxretry = 20", "findtime = 60"]
    small = jails.split("[caddy-post-5-60]\n")[1].split("\n\n")[0]
    assert "logpath = /var/log/caddy/charlie.asso.example.log" in small
    assert f["/etc/fail2ban/filter.d/selfhost-caddy-post.conf"] == web.POST_FILTER


def test_no_limit_no_jail() -> None:
    data = model()
    for plan in data["services"]["association"]["plans"].values():
        plan["post_per_minute"] = 0
    assert "caddy-post" not in files(data)["/etc/fail2ban/jail.local"]


def test_bad_thresholds_are_refused() -> None:
    data = model()
    data["services"]["association"]["plans"]["small"] = {"spike_requests_per_minute": -1}
    with pytest.raises(ValidationError, match="spike_requests_per_minute"):
        validated(data)


def _filter_regex() -> re.Pattern[str]:
    line = next(x for x in web.POST_FILTER.splitlines() if x.startswith("failregex"))
    return re.compile(line.split(" = ", 1)[1].replace("<HOST>", r"(?P<host>[0-9a-f.:]+)"))


def access(ip: str, method: str, ts: float, size: int = 100, uri: str = "/form.php") -> str:
    """One line as Caddy writes it in its JSON access log."""
    return json.dumps({
        "level": "info", "ts": ts, "logger": "http.log.access.log0", "msg": "handled request",
        "request": {"remote_ip": ip, "remote_port": "50000", "proto": "HTTP/2.0",
                    "method": method, "host": "alpha.asso.example", "uri": uri,
                    "headers": {"User-Agent": ["curl/8"], "X-Fake": ['"method":"POST",']}},
        "bytes_read": 6, "user_id": "", "duration": 0.01, "size": size, "status": 200,
        "resp_headers": {"Content-Type": ["text/html"]}}, separators=(",", ":"))


def test_the_filter_matches_posts_by_client_only() -> None:
    rx = _filter_regex()
    m = rx.search(access("192.0.2.10", "POST", 1.0))
    assert m is not None and m.group("host") == "192.0.2.10"
    assert rx.search(access("192.0.2.10", "GET", 1.0)) is None  # a header cannot fake it


def run_spikes(tmp_path: Path, lines: list[str], max_req: int = 5, max_mb: int = 1) -> str:
    """The spike script with stand-ins for logger, sendmail and hostname; its mail."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (tmp_path / "alpha.log").write_text("".join(x + "\n" for x in lines))
    (tmp_path / "watch.txt").write_text(
        f"# host\tlog\treq\tmb\nalpha.asso.example\t{tmp_path}/alpha.log\t{max_req}\t{max_mb}\n"
        f"bravo.example\t{tmp_path}/missing.log\t5\t1\n")
    (bin_ / "logger").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/logger\n")
    (bin_ / "hostname").write_text("#!/bin/sh\necho asso\n")
    for p in bin_.iterdir():
        p.chmod(0o755)
    mail = tmp_path / "mail"
    mail.unlink(missing_ok=True)
    script = web.SPIKES_TEXT.replace("/etc/selfhost/web-watch.txt", f"{tmp_path}/watch.txt")
    script = script.replace("/var/lib/selfhost/", f"{tmp_path}/state/")
    script = script.replace("[ -x /usr/sbin/sendmail ]", "true")
    script = script.replace("/usr/sbin/sendmail -oi -t", f"cat > {mail}")
    (tmp_path / "run.sh").write_text(script)
    subprocess.run(["sh", str(tmp_path / "run.sh")], env={"PATH": f"{bin_}:/usr/bin:/bin"},
                   check=True)
    return mail.read_text() if mail.exists() else ""


def test_spikes_alert_once_an_hour_per_site(tmp_path: Path) -> None:
    now = time.time()
    old = [access("198.51.100.1", "GET", now - 600) for _ in range(50)]  # not this minute
    calm = [access("198.51.100.2", "GET", now - 5) for _ in range(5)]
    assert run_spikes(tmp_path, old + calm) == ""
    assert not (tmp_path / "logger").exists()
    burst = calm + [access("198.51.100.3", "POST", now - 1, uri="/contact/send.php")] * 3
    sent = run_spikes(tmp_path, old + burst)
    assert sent.startswith("To: root\nSubject: [asso] web: traffic spike on "
                           "alpha.asso.example\n"), sent
    assert "8 requests (most 5) in the last minute" in sent
    assert "      5 198.51.100.2\n      3 198.51.100.3" in sent
    assert "      5 /form.php\n      3 /contact/send.php" in sent
    assert "bravo" not in sent
    # Still spiking a minute later: logged again, but the admins are not mailed again.
    assert run_spikes(tmp_path, old + burst) == ""
    assert (tmp_path / "logger").read_text().count("traffic spike on alpha.asso.example") == 2


def test_bandwidth_spikes_alert_too(tmp_path: Path) -> None:
    now = time.time()
    sent = run_spikes(tmp_path, [access("198.51.100.4", "GET", now - 2, size=700_000)] * 3,
                      max_req=0, max_mb=1)
    assert "2 MB served (most 1) in the last minute" in sent, sent
    assert "requests (most" not in sent


def test_a_long_phase_is_sent_in_parts_below_the_argument_limit() -> None:
    """A first deploy of the association example reloads about 20 units: as one batched
    script it passed Linux's 128 KiB limit for one argument (quoted twice by the podman
    connector) and failed with E2BIG; the batch is split."""
    from selfhost.backend import pyinfra as backend
    from selfhost.state import State

    cmds = [f"echo {i} {'x' * 6000}" for i in range(20)]
    gen = backend.plan_phase._inner  # type: ignore[attr-defined]
    orig = backend._phase_commands
    backend._phase_commands = lambda *a, **k: iter(cmds)  # type: ignore[assignment]
    try:
        out = list(gen("reloads", [], {}, State(), set()))
    finally:
        backend._phase_commands = orig  # type: ignore[assignment]
    assert len(out) > 1
    assert all(len(c) <= backend.BATCH_MAX + 200 for c in out)
    assert "".join(out).count("echo ") == 20
