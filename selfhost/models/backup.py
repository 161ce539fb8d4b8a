"""Backup policy: restic repositories (3-2-1 encouraged), retention, schedules, alerting.

Backups are enabled when at least one repository is listed. What is backed up is derived from
the enabled services' data paths, plus ``extra_paths``. Each repository has its own password
(a :class:`~selfhost.models.base.SecretRef`, never in this file), schedule and retention. See
:mod:`selfhost.backup` for what is deployed.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from selfhost.compose.module import Contribution, Env, Module
from selfhost.compose.requests import BackupSource, PeerBackupAccount, Request
from selfhost.models.base import Port, SecretRef, StrictModel

# Strings rendered into env files, unit files and shell glue: no quoting hazards.
_SAFE = re.compile(r'^[^"$`\\\n\r\']*$')
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,22}[a-z0-9])?$")
_DURATION = re.compile(r"^(\d+[ymdh])+$")
_SUBSET = re.compile(r"^(\d{1,3}(\.\d+)?%|\d+/\d+|\d+[KMGT])$")
_CALENDAR = re.compile(r"^[A-Za-z0-9*,.:/~ -]+$")


def _safe(value: str, what: str) -> str:
    if not _SAFE.match(value):
        raise ValueError(f"{what} may not contain quotes, '$', '`', '\\' or line breaks")
    return value


class Retention(StrictModel):
    """Which snapshots ``restic forget --prune`` keeps after each backup (restic's --keep-*)."""

    keep_within: str | None = Field(
        default=None,
        description="Keep every snapshot newer than this (restic duration, e.g. '2d', '1m15d').",
    )
    hourly: int = Field(default=0, ge=0, le=10000, description="Hourly snapshots to keep.")
    daily: int = Field(default=7, ge=0, le=10000, description="Daily snapshots to keep.")
    weekly: int = Field(default=4, ge=0, le=10000, description="Weekly snapshots to keep.")
    monthly: int = Field(default=12, ge=0, le=10000, description="Monthly snapshots to keep.")
    yearly: int = Field(default=2, ge=0, le=10000, description="Yearly snapshots to keep.")

    @field_validator("keep_within")
    @classmethod
    def _within(cls, v: str | None) -> str | None:
        if v is not None and not _DURATION.match(v):
            raise ValueError("a restic duration such as '7d', '2m', '1y6m' or '36h'")
        return v

    @model_validator(mode="after")
    def _something(self) -> Retention:
        if not self.keep_within and not any(
            (self.hourly, self.daily, self.weekly, self.monthly, self.yearly)
        ):
            raise ValueError("the retention keeps nothing: set keep_within or a count above 0")
        return self

    def forget_args(self) -> list[str]:
        out: list[str] = []
        if self.keep_within:
            out += ["--keep-within", self.keep_within]
        for name in ("hourly", "daily", "weekly", "monthly", "yearly"):
            n = getattr(self, name)
            if n:
                out += [f"--keep-{name}", str(n)]
        return out


class Repository(StrictModel):
    """One restic repository the server backs up to."""

    name: str = Field(
        description="Short name (a-z, 0-9, '-'), used in unit names: selfhost-backup-<name>.",
        examples=["usb", "friend", "cloud"],
    )
    type: Literal["local", "sftp", "rest", "rclone"] = Field(
        description="'local' (a directory, e.g. a mounted USB disk), 'sftp' (a host over SSH, "
        "possibly a `peer` of the same inventory), 'rest' (restic's REST server) or 'rclone'.",
    )
    password: SecretRef = Field(
        description="Where the repository password is kept on the deploying machine "
        "({env: VAR} or {file: PATH}). It is written to a root-only 0600 file on the server "
        "and passed to restic with RESTIC_PASSWORD_FILE, never on a command line.",
    )
    path: str | None = Field(
        default=None,
        description="local: absolute directory of the repository. sftp: directory on the remote "
        "host (for a `peer`, relative to the account's chrooted home; default 'restic-<host>').",
    )
    host: str | None = Field(
        default=None,
        description="sftp: address of the SSH server. With `peer`, the address to reach the peer "
        "at (default: the peer's first address in the fleet file, else its host name).",
    )
    port: Port = Field(default=22, description="sftp: SSH port.")
    user: str | None = Field(
        default=None,
        description="sftp: login on the remote host (default for a peer: 'backup-<hostname>').",
    )
    peer: str | None = Field(
        default=None,
        description="sftp: name of another host of the same fleet file that keeps this "
        "repository (the friend's backup host). The plan then covers both ends: a key-only, "
        "sftp-only, chrooted account there; the key and known_hosts entry here.",
    )
    host_key: str | None = Field(
        default=None,
        description="sftp without `peer`: the remote's public host key ('ssh-ed25519 AAAA...'), "
        "written to the repository's known_hosts. A peer's is read from it at deploy time.",
    )
    url: str | None = Field(
        default=None,
        description="rest: URL of the REST server, e.g. 'https://backup.example.org:8000/nas/'.",
    )
    rest_user: str | None = Field(default=None, description="rest: HTTP user name, if any.")
    rest_password: SecretRef | None = Field(
        default=None,
        description="rest: where the HTTP password is kept (URL-safe characters only).",
    )
    remote: str | None = Field(
        default=None,
        description="rclone: 'remote:path', a remote configured in `rclone_config` on the server.",
    )
    rclone_config: str = Field(
        default="/root/.config/rclone/rclone.conf",
        description="rclone: configuration file on the server (managed by you: it holds tokens).",
    )
    schedule: str = Field(
        default="daily",
        description="When to back up (systemd OnCalendar=, e.g. 'daily', '*-*-* 02:30').",
    )
    randomized_delay_minutes: int = Field(
        default=60, ge=0, le=1440,
        description="RandomizedDelaySec= of the timer, in minutes (spreads load).",
    )
    check_schedule: str = Field(
        default="weekly",
        description="When to run `restic check --read-data-subset` (systemd OnCalendar=).",
    )
    check_read_data_subset: str = Field(
        default="5%",
        description="How much pack data each check re-reads: '5%', '1/10' or a size like '500M'.",
    )
    max_age_hours: int = Field(
        default=36, ge=1, le=24 * 366,
        description="Alert (journal, priority err) when the last successful backup is older.",
    )
    retention: Retention = Field(
        default_factory=Retention, description="Which snapshots to keep (forget --prune)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("1-24 of a-z, 0-9 and '-', not starting or ending with '-'")
        return v

    @field_validator("path", "host", "user", "host_key", "url", "rest_user", "remote", "rclone_config")
    @classmethod
    def _strings(cls, v: str | None) -> str | None:
        return None if v is None else _safe(v, "this value")

    @field_validator("host_key")
    @classmethod
    def _host_key(cls, v: str | None) -> str | None:
        if v is not None and len(v.split()) < 2:
            raise ValueError("a public host key line, 'TYPE BASE64' (e.g. 'ssh-ed25519 AAAA...')")
        return v

    @field_validator("schedule", "check_schedule")
    @classmethod
    def _calendar(cls, v: str) -> str:
        if not _CALENDAR.match(v):
            raise ValueError("a systemd calendar expression such as 'daily' or '*-*-* 02:30'")
        return v

    @field_validator("check_read_data_subset")
    @classmethod
    def _subset(cls, v: str) -> str:
        if not _SUBSET.match(v):
            raise ValueError("'N%', 'n/t' or a size such as '500M'")
        return v

    @model_validator(mode="after")
    def _by_type(self) -> Repository:
        need: dict[str, tuple[str, ...]] = {
            "local": ("path",), "sftp": (), "rest": ("url",), "rclone": ("remote",),
        }
        allowed: dict[str, set[str]] = {
            "local": {"path"},
            "sftp": {"path", "host", "user", "peer", "host_key"},
            "rest": {"url", "rest_user", "rest_password"},
            "rclone": {"remote"},
        }
        for f in need[self.type]:
            if getattr(self, f) is None:
                raise ValueError(f"a {self.type} repository needs `{f}`")
        for f in ("path", "host", "user", "peer", "host_key", "url", "rest_user", "rest_password", "remote"):
            if getattr(self, f) is not None and f not in allowed[self.type]:
                raise ValueError(f"`{f}` does not apply to a {self.type} repository")
        if self.type == "local" and not (self.path or "").startswith("/"):
            raise ValueError("a local repository's `path` must be absolute")
        if self.type == "sftp":
            if self.peer is None and (self.host is None or self.user is None or not self.path):
                raise ValueError("an sftp repository needs `host`, `user` and `path`, or `peer`")
            if self.peer is not None:
                _check_peer(self.peer)
                if self.host_key is not None:
                    raise ValueError("a peer's host key is read from it: drop `host_key`")
            elif self.host_key is None:
                raise ValueError("an sftp repository without `peer` needs `host_key`")
        if self.type == "rest" and not re.match(r"^https?://", self.url or ""):
            raise ValueError("a rest repository's `url` starts with https:// (or http://)")
        if self.type == "rest" and (self.rest_user is None) != (self.rest_password is None):
            raise ValueError("give both `rest_user` and `rest_password`, or neither")
        if self.type == "rclone" and ":" not in (self.remote or ""):
            raise ValueError("an rclone `remote` looks like 'name:path'")
        return self


def _check_peer(value: str) -> None:
    if not re.match(r"^[A-Za-z0-9@][A-Za-z0-9._@/:-]*$", value):
        raise ValueError(f"`peer` {value!r} is not an inventory host name")


class BackupPolicy(StrictModel, Module):
    """Where and how often the server's data is backed up (restic).

    Backups are on when ``repositories`` is not empty (and ``enabled`` is not false)."""

    enabled: bool = Field(
        default=True,
        description="Deploy the backup timers for the repositories below (false pauses them "
        "without removing the repositories from the model).",
    )
    repositories: list[Repository] = Field(
        default_factory=list,
        description="restic repositories, each with its own password, schedule and retention. "
        "3-2-1: keep at least one off-site (sftp peer, rest or rclone).",
    )
    extra_paths: list[str] = Field(
        default_factory=list,
        description="Absolute paths backed up in addition to the enabled services' data.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="restic exclude patterns (e.g. '*.tmp', '/var/lib/app/cache').",
    )
    key_dir: str = Field(
        default="~/.config/selfhost/backup-keys",
        description="Directory on the deploying machine where the SSH keys of sftp `peer` "
        "repositories are generated and kept (0700).",
    )
    @property
    def active(self) -> bool:
        """Whether anything is deployed."""
        return self.enabled and bool(self.repositories)

    # ---- module: the provider of backup sources (see selfhost.backup.restic)
    provides: ClassVar[tuple[type[Request], ...]] = (BackupSource,)
    uses: ClassVar[tuple[type[Request], ...]] = (PeerBackupAccount,)

    def requests(self, env: Env) -> list[Request]:
        from selfhost.backup.fleet import key_path

        if not self.active:
            return []
        return [PeerBackupAccount(on_host=repo.peer, client=env.server.hostname, repo=repo.name,
                                  key_name=str(key_path(env.server, repo)),
                                  origin=f"{env.path}.repositories.{i}.peer")
                for i, repo in enumerate(self.repositories)
                if repo.type == "sftp" and repo.peer is not None]

    def contribute(self, env: Env) -> Contribution:
        from selfhost.backup import restic

        return restic.contribute(env)

    @field_validator("extra_paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            _safe(p, "a path")
            if not p.startswith("/") or ".." in p.split("/"):
                raise ValueError(f"{p!r}: extra paths are absolute, without '..'")
        return v

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v: list[str]) -> list[str]:
        for p in v:
            _safe(p, "an exclude pattern")
        return v

    @model_validator(mode="after")
    def _unique(self) -> BackupPolicy:
        names = [r.name for r in self.repositories]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"repository names must be unique: {', '.join(sorted(dup))}")
        return self
