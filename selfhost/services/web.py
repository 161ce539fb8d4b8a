"""The web server: Caddy (Debian's package), with automatic HTTPS.

It serves the static sites of its model, and it is the provider of
:class:`~selfhost.compose.requests.VirtualHost` requests (another module's reverse proxy
route or static root, optionally behind HTTP basic auth and limited to the LAN or the VPN)
and of :class:`~selfhost.compose.requests.Certificate` requests (certificates for other
daemons: mail, XMPP).

HTTPS uses Caddy's internal CA for names that are not publicly resolvable (``home.arpa``,
``.lan``, ``.internal``, ``.test``, ...), ACME (Let's Encrypt / ZeroSSL) otherwise. It
requests ports 80 and 443 (in the widest zone of its hosts), each static site's root and
Caddy's certificates as backup sources, a CNAME per host name, and, when a host has logins,
a fail2ban jail on failed logins and a firewall guard so that only Caddy reaches the
upstream it authenticates for. A virtual host with a traffic watch (``watch``: a member's
site) gets a fail2ban jail banning a client over its POST limit (one jail per limit, over
the hosts' JSON access logs) and a line in ``/etc/selfhost/web-watch.txt``, read every minute
by ``web-spikes.sh``, which alerts root (every admin) on a request or bandwidth spike.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    BackupSource,
    Certificate,
    DnsRecord,
    HealthCheck,
    Jail,
    LoopbackGuard,
    Port,
    Request,
    SystemUser,
    TrafficWatch,
    VirtualHost,
    Zone,
)
from selfhost.compose.resources import (
    SECRET_MARK,
    Command,
    ManagedDir,
    ManagedFile,
    SecretPiece,
    Unit,
)
from selfhost.models.base import StrictModel
from selfhost.services.base import Service

PRIVATE_SUFFIXES = ("home.arpa", "lan", "local", "internal", "test", "example", "invalid",
                    "localhost", "localdomain", "home", "corp")
CADDYFILE = "/etc/caddy/Caddyfile"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: a header name


def is_public_domain(domain: str) -> bool:
    """Whether certificates for ``domain`` can come from a public ACME CA."""
    return not any(domain == s or domain.endswith("." + s) for s in PRIVATE_SUFFIXES)


class Site(StrictModel):
    """One static web site."""

    host: str = Field(
        description="Host name of the site: a label relative to the server's domain ('www'), "
        "'@' for the domain itself, or a full name ending in the domain.",
        examples=["www", "@", "blog.example.org"],
    )
    source: str | None = Field(
        default=None,
        description="Local directory (relative to the YAML file) whose files are uploaded as the "
        "site's content on every deploy. Without it the content is managed by you and backed up.",
    )
    root: str | None = Field(
        default=None,
        description="Directory on the server holding the site (default /srv/www/<full host>).",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra HTTP response headers to set (name to value).",
    )

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        v = v.lower().rstrip(".")
        label = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
        if v != "@" and not re.fullmatch(rf"{label}(\.{label})*", v):
            raise ValueError("not a valid host name")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _TOKEN.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not an HTTP header name: letters, digits and "
                    "!#$%&'*+-.^_`|~ only (e.g. 'Cache-Control')")
        return v

    @field_validator("root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or ".." in v.split("/")):
            raise ValueError("must be an absolute path without '..'")
        return v

    def fqdn(self, domain: str) -> str:
        if self.host == "@":
            return domain
        if self.host == domain or self.host.endswith("." + domain):
            return self.host
        return f"{self.host}.{domain}"

    def document_root(self, domain: str) -> str:
        return self.root or f"/srv/www/{self.fqdn(domain)}"




class WebService(Service):
    """Static web sites and other modules' virtual hosts, served by Caddy, HTTPS included."""

    kind: ClassVar[str] = "web"
    provides: ClassVar[tuple[type[Request], ...]] = (VirtualHost, Certificate)
    uses: ClassVar[tuple[type[Request], ...]] = (Port, BackupSource, DnsRecord, Jail,
                                                 HealthCheck, LoopbackGuard, SystemUser)

    sites: list[Site] = Field(default_factory=list, description="The static sites to serve.")
    tls: Literal["auto", "internal", "acme"] = Field(
        default="auto",
        description="Certificates: 'internal' (Caddy's own CA, for LAN-only domains), 'acme' "
        "(public CA; the names must resolve to this server), or 'auto' (internal for private "
        "names such as *.home.arpa, ACME otherwise).",
    )
    acme_email: str | None = Field(
        default=None,
        pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
        description="Contact e-mail given to the ACME CA (expiry notices).",
    )
    lan_only: bool = Field(
        default=False,
        description="Serve the static sites only to the LAN networks in hardening.firewall.lan.",
    )

    @model_validator(mode="after")
    def _unique_hosts(self) -> WebService:
        seen: set[str] = set()
        for site in self.sites:
            if site.host in seen:
                raise ValueError(f"site host {site.host!r} is listed twice")
            seen.add(site.host)
        return self

    def caa_records(self, domain: str, names: list[str]) -> list[Request]:
        """CAA: only the CAs Caddy asks (Let's Encrypt, then ZeroSSL, whose CA is Sectigo) may
        issue for the public names; one set at the server's domain covers the names under it."""
        owners = sorted({domain if n == domain or n.endswith("." + domain) else n
                         for n in names if self.tls_mode(n) == "acme"})
        return [DnsRecord(o, "CAA", f'0 issue "{ca}"', note="Caddy's ACME CAs" if ca ==
                          "letsencrypt.org" else "") for o in owners
                for ca in ("letsencrypt.org", "sectigo.com")]

    def tls_mode(self, name: str) -> Literal["internal", "acme"]:
        if self.tls == "auto":
            return "acme" if is_public_domain(name) else "internal"
        return self.tls

    def assertions(self, env: Env) -> list[Problem]:
        if env.server.services.web is self and not self.sites and not env.incoming(VirtualHost) \
                and not env.incoming(Certificate):
            return [Problem(("services", "web", "sites"), "no site, and no other service asks "
                            "for a virtual host or a certificate: add a site, or remove "
                            "services.web")]
        return []

    def site_vhosts(self, env: Env) -> list[VirtualHost]:
        """The static sites, as virtual hosts (the web module requests them of itself, so
        that a site and another module's host of the same name are a conflict)."""
        domain = env.server.domain
        zone: Zone = "lan" if self.lan_only else "internet"
        return [VirtualHost(site.fqdn(domain), root=site.document_root(domain), zone=zone,
                            headers=tuple(site.headers.items()),
                            origin=f"{env.path}.sites.{i}")
                for i, site in enumerate(self.sites)]

    def vhosts(self, env: Env) -> list[VirtualHost]:
        """Every virtual host: the static sites, then the other modules' requests."""
        own = env.path + "."
        return self.site_vhosts(env) + [v for v in env.incoming(VirtualHost)
                                        if not v.origin.startswith(own)]

    def requests(self, env: Env) -> list[Request]:
        server = env.server
        vhosts = self.vhosts(env)
        certs = env.incoming(Certificate)
        if not vhosts and not certs:
            return []
        out: list[Request] = list(self.site_vhosts(env))
        zones: set[Zone] = {v.zone for v in vhosts}
        if not zones or "internet" in zones or certs:
            zones = {"internet"}
        for zone in sorted(zones):
            out += [Port(80, "tcp", zone), Port(443, "tcp", zone),
                    Port(443, "udp", zone, comment="HTTP/3")]
        for i, site in enumerate(self.sites):
            if site.source is None:
                out.append(BackupSource(site.document_root(server.domain),
                                        origin=f"{env.path}.sites.{i}"))
        out.append(BackupSource("/var/lib/caddy"))
        names: set[str] = set()
        for v in vhosts:
            if v.host in names:
                continue  # a conflict, reported once (as a virtual host)
            names.add(v.host)
            if v.host != server.domain:
                out.append(DnsRecord(v.host, "CNAME", server.fqdn + ".", origin=v.origin))
            else:  # the apex cannot be a CNAME (it has SOA/NS): the server's addresses
                out += [DnsRecord(v.host, "A" if a.version == 4 else "AAAA", str(a),
                                  origin=v.origin) for a in server.addresses.public]
            out.append(HealthCheck("https", f"https://{v.host}/", origin=v.origin))
        out += self.caa_records(server.domain, sorted(names | {c for r in certs for c in r.names}))
        logins = [v for v in vhosts if v.auth]
        if logins:
            out.append(Jail("caddy-auth", port="80,443", filter="selfhost-caddy-auth",
                            logpath="\n          ".join(log_file(v.host) for v in logins),
                            filter_definition=AUTH_FILTER))
        out += post_jails(vhosts)
        for v in logins:
            if v.upstream:
                out.append(LoopbackGuard(int(v.upstream.rsplit(":", 1)[1]), ("caddy", "root"),
                                         origin=v.origin))
        for c in certs:
            # Seconds of validity left below which it is a problem: Caddy's internal CA issues
            # 12-hour certificates (renewed after about 8), ACME ones last 90 days.
            left = 14 * 86400 if self.tls_mode(c.names[0]) == "acme" else 3600
            out.append(HealthCheck("certificate", c.names[0], expect=str(left),
                                   origin=c.origin))
        return out

    def caddyfile(self, env: Env) -> tuple[str, tuple[SecretPiece, ...]]:
        """The Caddyfile, with markers for the password hashes of its logins."""
        vhosts = self.vhosts(env)
        certs = env.incoming(Certificate)
        modes = {self.tls_mode(v.host) for v in vhosts} | {
            self.tls_mode(n) for c in certs for n in c.names}
        lines = ["# Managed by selfhost: changes here are overwritten on the next deploy.", "{"]
        if "acme" in modes and self.acme_email:
            lines.append(f"\temail {self.acme_email}")
        if "internal" in modes:
            # The server does not need to trust its own CA. Without this, caddy (no sudo
            # rights) tries `sudo tee` into the system trust store at start: failed sudo
            # attempts in the auth log, the kind of line an admin should be able to alert on.
            lines.append("\tskip_install_trust")
        lines += ["\tadmin localhost:2019", "}", ""]
        secrets: list[SecretPiece] = []
        fw = env.server.hardening.firewall
        for v in sorted(vhosts, key=lambda v: v.host):
            lines.append(f"{v.host} {{")
            if v.upstream is None:
                lines.append(f"\troot * {v.root}")
                if v.php_fastcgi:
                    lines.append(f"\tphp_fastcgi unix/{v.php_fastcgi}")
                lines.append("\tfile_server")
            lines.append("\tencode zstd gzip")
            if self.tls_mode(v.host) == "internal":
                lines.append("\ttls internal")
            if v.zone != "internet":
                nets = [str(n) for n in fw.zone_networks(env, v.zone)]
                lines.append(f"\t@outside not remote_ip {' '.join(nets) or '127.0.0.1/32'}")
                lines.append(f'\trespond @outside "This site is for the {v.zone.upper()} '
                             'only." 403')
            headers = {
                "Strict-Transport-Security": '"max-age=31536000"',
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "strict-origin-when-cross-origin",
                "X-Frame-Options": "SAMEORIGIN",
            }
            headers.update({k: _quote(val) for k, val in v.headers})
            lines.append("\theader {")
            for name in sorted(headers):
                lines.append(f"\t\t{name} {headers[name]}")
            lines.append("\t\t-Server")
            lines.append("\t}")
            if v.max_body_mb:
                lines += ["\trequest_body {", f"\t\tmax_size {v.max_body_mb}MB", "\t}"]
            if v.auth:
                lines.append("\tbasicauth {")
                for user in sorted(v.auth, key=lambda u: u.name):
                    lines.append(f"\t\t{user.name} {SECRET_MARK.format(len(secrets))}")
                    secrets.append(SecretPiece(user.password, "bcrypt-base64",
                                               context=f"{env.server.fqdn}/{v.host}/{user.name}"))
                lines.append("\t}")
            if v.upstream is not None:
                lines.append(f"\treverse_proxy {v.upstream} {{")
                if v.auth:
                    lines.append("\t\theader_up X-Remote-User {http.auth.user.id}")
                else:
                    lines.append("\t\theader_up -X-Remote-User")
                lines.append("\t}")
            lines.append("\tlog {")
            lines.append(f"\t\toutput file {log_file(v.host)}")
            lines.append("\t}")
            lines.append("}")
            lines.append("")
        served = {v.host for v in vhosts}
        for c in sorted(certs, key=lambda c: c.names):
            for name in c.names:
                if name in served:
                    continue
                served.add(name)
                lines.append(f"{name} {{")
                if self.tls_mode(name) == "internal":
                    lines.append("\ttls internal")
                lines.append(f'\trespond "certificate of {name}" 404')
                lines.append("}")
                lines.append("")
        return "\n".join(lines), tuple(secrets)

    def contribute(self, env: Env) -> Contribution:
        server = env.server
        vhosts = self.vhosts(env)
        certs = env.incoming(Certificate)
        c = Contribution()
        if not vhosts and not certs:
            return c
        c.packages.append("caddy")
        for site in self.sites:
            root = site.document_root(server.domain)
            c.directories.append(ManagedDir(root, mode="0755", owner="root", group="root"))
            if site.source is not None:
                src = Path(site.source)
                if not src.is_absolute():
                    src = server.base_dir / src
                c.sync_dirs.append((str(src), root))
        text, secrets = self.caddyfile(env)
        # With logins, the file holds password hashes: readable by caddy only.
        c.files.append(ManagedFile(
            CADDYFILE, text, mode="0640" if secrets else "0644",
            group="caddy" if secrets else "root", secrets=secrets,
            validate="caddy validate --adapter caddyfile --config {path}"))
        for v in vhosts:
            if v.auth or (v.watch is not None and v.watch.post_max):
                # fail2ban reads these logs: they must exist before fail2ban (re)starts.
                log = log_file(v.host)
                c.commands.append(Command(
                    f"web: log file {log}", "install -d -o caddy -g adm -m 0750 /var/log/caddy"
                    f" && install -o caddy -g adm -m 0640 /dev/null {log}",
                    unless=f"test -e {log}"))
        c.units.append(Unit("caddy.service", reload_on=(CADDYFILE,)))
        spike_contribute(c, vhosts)
        if certs:
            c.directories.append(ManagedDir(CERT_DIR, "0755"))
            c.directories.append(ManagedDir("/usr/local/lib/selfhost", "0755"))
            c.files += cert_export_files(self, certs)
            c.commands.append(Command("web: reload systemd units", "systemctl daemon-reload",
                                      on_change=(CERT_UNIT, CERT_TIMER)))
            c.units.append(Unit("selfhost-cert-export.timer", reload_on=(CERT_TIMER,),
                                reload=False))
        return c


def log_file(host: str) -> str:
    return f"/var/log/caddy/{host}.log"


POST_FILTER = r"""# Managed by selfhost: POST requests (forms, logins) in Caddy's JSON access logs, per
# client address. JSON escapes quotes inside values, so a header cannot fake these keys.
[Definition]
failregex = ^\{.*"remote_ip":"<HOST>",.*"method":"POST",
datepattern = "ts":{EPOCH}
"""

WATCH_LIST = "/etc/selfhost/web-watch.txt"
SPIKES_SCRIPT = "/usr/local/sbin/selfhost-web-spikes"
SPIKES_UNIT = "/etc/systemd/system/selfhost-web-spikes.service"
SPIKES_TIMER = "/etc/systemd/system/selfhost-web-spikes.timer"
SPIKES_TEXT = (Path(__file__).parent / "web-spikes.sh").read_text(encoding="utf-8")


def post_jails(vhosts: list[VirtualHost]) -> list[Jail]:
    """One fail2ban jail per POST limit (count, seconds) of the watched virtual hosts: a
    client over it is banned from the web ports."""
    groups: dict[tuple[int, int], list[str]] = {}
    for v in vhosts:
        w = v.watch
        if w is not None and w.post_max:
            groups.setdefault((w.post_max, w.post_seconds), []).append(log_file(v.host))
    return [Jail(f"caddy-post-{n}-{s}", port="80,443", filter="selfhost-caddy-post",
                 logpath="\n          ".join(sorted(set(logs))), maxretry=n, findtime=s,
                 filter_definition=POST_FILTER)
            for (n, s), logs in sorted(groups.items())]


def spike_contribute(c: Contribution, vhosts: list[VirtualHost]) -> None:
    """The list of watched sites and the timer that alerts on their traffic spikes."""
    rows = sorted({(v.host, v.watch) for v in vhosts if v.watch is not None and (
        v.watch.requests_per_minute or v.watch.mb_per_minute)}, key=lambda r: r[0])
    if not rows:
        return
    watch: list[tuple[str, TrafficWatch]] = [(h, w) for h, w in rows if w is not None]
    c.directories.append(ManagedDir("/etc/selfhost", "0755"))
    c.files.append(ManagedFile(WATCH_LIST, "# host\taccess log\trequests/min\tMB/min\n" + "".join(
        f"{h}\t{log_file(h)}\t{w.requests_per_minute}\t{w.mb_per_minute}\n"
        for h, w in watch), mode="0644"))
    c.files.append(ManagedFile(SPIKES_SCRIPT, SPIKES_TEXT, mode="0755",
                               validate="sh -n {path}"))
    c.files.append(ManagedFile(SPIKES_UNIT, "# Managed by selfhost\n[Unit]\nDescription="
                               "selfhost: alert on web traffic spikes per site\n\n[Service]\n"
                               f"Type=oneshot\nExecStart={SPIKES_SCRIPT}\n"))
    c.files.append(ManagedFile(SPIKES_TIMER, "# Managed by selfhost\n[Unit]\nDescription="
                               "selfhost: look for web traffic spikes, every minute\n\n"
                               "[Timer]\nOnBootSec=60\nOnUnitActiveSec=60\nAccuracySec=5\n\n"
                               "[Install]\nWantedBy=timers.target\n"))
    c.commands.append(Command("web: reload systemd units (spike alerts)",
                              "systemctl daemon-reload", on_change=(SPIKES_UNIT, SPIKES_TIMER)))
    c.units.append(Unit("selfhost-web-spikes.timer", reload_on=(SPIKES_TIMER, SPIKES_UNIT),
                        reload=False))


AUTH_FILTER = r"""# Managed by selfhost: failed HTTP basic-auth logins in Caddy's JSON access logs.
# Only requests that carried credentials count (a client's first, unauthenticated request
# is answered 401 too); Caddy logs the Authorization header's value redacted (an empty list in
# Caddy 2.6, "REDACTED" later). JSON escapes quotes inside values, so a header cannot fake
# these keys.
[Definition]
failregex = ^\{.*"remote_ip":"<HOST>",.*"Authorization":\[(?:"REDACTED")?\].*"status":401[,}]
datepattern = "ts":{EPOCH}
"""

CERT_DIR = "/etc/selfhost/tls"
CERT_SCRIPT = "/usr/local/lib/selfhost/cert-export"
CERT_LIST = "/etc/selfhost/tls/certificates.txt"
CERT_UNIT = "/etc/systemd/system/selfhost-cert-export.service"
CERT_TIMER = "/etc/systemd/system/selfhost-cert-export.timer"


def cert_export_files(web: WebService, certs: list[Certificate]) -> list[ManagedFile]:
    """The script, list and timer that copy Caddy's certificates out for other daemons and
    reload them when a certificate changed."""
    rows = []
    for c in sorted(certs, key=lambda c: c.names):
        rows.append(f"{c.names[0]}\t{c.group}\t{' '.join(c.reload) or '-'}")
    return [
        ManagedFile(CERT_LIST, "# name\tgroup\tunits to reload\n"
                    + "".join(r + "\n" for r in rows), mode="0644"),
        ManagedFile(CERT_SCRIPT, CERT_EXPORT, mode="0755", validate="bash -n {path}"),
        ManagedFile(CERT_UNIT, "[Unit]\nDescription=selfhost: export TLS certificates from "
                    "Caddy\nAfter=caddy.service\n\n[Service]\nType=oneshot\n"
                    f"ExecStart={CERT_SCRIPT}\n"),
        ManagedFile(CERT_TIMER, "[Unit]\nDescription=selfhost: export renewed TLS "
                    "certificates\n\n[Timer]\nOnActiveSec=30s\nOnUnitActiveSec=1h\n\n"
                    "[Install]\nWantedBy=timers.target\n"),
    ]


CERT_EXPORT = r"""#!/bin/bash
# Managed by selfhost: copy the certificates Caddy obtained (ACME or its internal CA) to
# /etc/selfhost/tls/NAME/{fullchain,privkey}.pem for other daemons, and reload the units
# that read them when a certificate changed.
set -euo pipefail
store=/var/lib/caddy/.local/share/caddy/certificates
while IFS=$'\t' read -r name group units; do
  case $name in ''|'#'*) continue ;; esac
  src=$(find "$store" -path "*/$name/$name.crt" -print -quit 2>/dev/null || true)
  if [ -z "$src" ]; then
    echo "selfhost: no certificate for $name from Caddy yet" >&2
    continue
  fi
  key=${src%.crt}.key
  dir=/etc/selfhost/tls/$name
  install -d -m 0750 -g "$group" "$dir"
  if cmp -s "$src" "$dir/fullchain.pem" && cmp -s "$key" "$dir/privkey.pem"; then
    continue
  fi
  install -m 0644 "$src" "$dir/fullchain.pem.new"
  install -m 0640 -g "$group" "$key" "$dir/privkey.pem.new"
  mv -f "$dir/fullchain.pem.new" "$dir/fullchain.pem"
  mv -f "$dir/privkey.pem.new" "$dir/privkey.pem"
  echo "selfhost: certificate of $name updated"
  if [ "$units" != - ]; then
    for u in $units; do systemctl try-reload-or-restart "$u" || true; done
  fi
done < /etc/selfhost/tls/certificates.txt
"""


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
