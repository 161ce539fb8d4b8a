"""Static web sites served by Caddy (Debian's package), with automatic HTTPS.

HTTPS uses Caddy's internal CA when the server's domain is not publicly resolvable
(``home.arpa``, ``.lan``, ``.internal``, ``.test``, ...), ACME (Let's Encrypt / ZeroSSL)
otherwise. Contributes: the ``caddy`` package, ``/etc/caddy/Caddyfile`` (validated with
``caddy validate`` before reload), ports 80 and 443, each site's root as data to back up,
and an A/AAAA-style DNS record per site.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from selfhost.models.base import StrictModel
from selfhost.services.base import (
    Contribution,
    DataPath,
    DnsRecord,
    ManagedDir,
    ManagedFile,
    OpenPort,
    Service,
    Unit,
)

if TYPE_CHECKING:
    from selfhost.models.server import Server

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
    """Static web sites served by Caddy, HTTPS included."""

    kind: ClassVar[str] = "web"

    sites: list[Site] = Field(
        default_factory=list, min_length=1, description="The sites to serve (at least one)."
    )
    tls: Literal["auto", "internal", "acme"] = Field(
        default="auto",
        description="Certificates: 'internal' (Caddy's own CA, for LAN-only domains), 'acme' "
        "(public CA; the names must resolve to this server), or 'auto' (internal for private "
        "domains such as home.arpa, ACME otherwise).",
    )
    acme_email: str | None = Field(
        default=None,
        pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
        description="Contact e-mail given to the ACME CA (expiry notices).",
    )
    lan_only: bool = Field(
        default=False,
        description="Accept HTTP(S) only from the LAN networks in hardening.firewall.lan.",
    )

    @model_validator(mode="after")
    def _unique_hosts(self) -> WebService:
        seen: set[str] = set()
        for site in self.sites:
            if site.host in seen:
                raise ValueError(f"site host {site.host!r} is listed twice")
            seen.add(site.host)
        return self

    def tls_mode(self, domain: str) -> Literal["internal", "acme"]:
        if self.tls == "auto":
            return "acme" if is_public_domain(domain) else "internal"
        return self.tls

    def caddyfile(self, server: Server) -> str:
        domain = server.domain
        mode = self.tls_mode(domain)
        lines = ["# Managed by selfhost: changes here are overwritten on the next deploy.", "{"]
        if mode == "acme" and self.acme_email:
            lines.append(f"\temail {self.acme_email}")
        if mode == "internal":
            # The server does not need to trust its own CA. Without this, caddy (no sudo
            # rights) tries `sudo tee` into the system trust store at start: failed sudo
            # attempts in the auth log, the kind of line an admin should be able to alert on.
            lines.append("\tskip_install_trust")
        lines += ["\tadmin localhost:2019", "}", ""]
        for site in sorted(self.sites, key=lambda s: s.fqdn(domain)):
            fqdn = site.fqdn(domain)
            lines.append(f"{fqdn} {{")
            lines.append(f"\troot * {site.document_root(domain)}")
            lines.append("\tfile_server")
            lines.append("\tencode zstd gzip")
            if mode == "internal":
                lines.append("\ttls internal")
            headers = {
                "Strict-Transport-Security": '"max-age=31536000"',
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "strict-origin-when-cross-origin",
                "X-Frame-Options": "SAMEORIGIN",
            }
            headers.update({k: _quote(v) for k, v in site.headers.items()})
            lines.append("\theader {")
            for name in sorted(headers):
                lines.append(f"\t\t{name} {headers[name]}")
            lines.append("\t\t-Server")
            lines.append("\t}")
            lines.append("\tlog {")
            lines.append(f"\t\toutput file /var/log/caddy/{fqdn}.log")
            lines.append("\t}")
            lines.append("}")
            lines.append("")
        return "\n".join(lines)

    def contribute(self, server: Server) -> Contribution:
        c = Contribution(packages=["caddy"])
        domain = server.domain
        for site in self.sites:
            root = site.document_root(domain)
            c.directories.append(ManagedDir(root, mode="0755", owner="root", group="root"))
            if site.source is not None:
                src = Path(site.source)
                if not src.is_absolute():
                    src = server.base_dir / src
                c.sync_dirs.append((str(src), root))
            else:
                c.data.append(DataPath(root, service=self.kind))
            if site.fqdn(domain) != domain:  # the apex cannot be a CNAME (it has SOA/NS)
                c.dns.append(DnsRecord(site.fqdn(domain), "CNAME", server.fqdn + "."))
        c.data.append(DataPath("/var/lib/caddy", service=self.kind))
        c.files.append(
            ManagedFile(
                CADDYFILE,
                self.caddyfile(server),
                validate="caddy validate --adapter caddyfile --config {path}",
            )
        )
        c.units.append(Unit("caddy.service", reload_on=(CADDYFILE,)))
        for port in (80, 443):
            c.ports.append(OpenPort(port, "tcp", self.kind, lan_only=self.lan_only))
        c.ports.append(OpenPort(443, "udp", self.kind, lan_only=self.lan_only, comment="HTTP/3"))
        return c


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
