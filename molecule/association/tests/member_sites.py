"""Helpers of the association scenario's tests (not a test file): put a member's file in
place, and ask Caddy for a member site's page from inside the server."""

from __future__ import annotations

import os
import shlex
from typing import Any

CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
"""Caddy's local CA: the test sites' certificates chain to it."""


def put(host: Any, path: str, text: str, owner: str) -> None:
    """Write ``text`` to ``path``, owned by the member (its directory, if missing, made and
    given to the member; an existing one is left as it is)."""
    q = shlex.quote
    d = q(os.path.dirname(path))
    res = host.run(f"{{ [ -d {d} ] || {{ mkdir -p {d} && chown {owner}:{owner} {d}; }}; }} && "
                   f"printf %s {q(text)} > {q(path)} && chown {owner}:{owner} {q(path)} && "
                   f"chmod 0644 {q(path)}")
    assert res.rc == 0, res.stderr


def get(host: Any, site: str, path: str, timeout: int = 15) -> tuple[int, str]:
    """GET https://SITE/PATH through Caddy on 127.0.0.1: (status, body); status 0 when no
    answer came."""
    res = host.run(f"b=$(mktemp) && curl -sS --max-time {timeout} --cacert {CA} --resolve "
                   f"{site}:443:127.0.0.1 -o \"$b\" -w '%{{http_code}}' "
                   f"{shlex.quote(f'https://{site}{path}')}; echo; cat \"$b\"; rm -f \"$b\"")
    status, _, body = res.stdout.partition("\n")
    return int(status or 0), body
