"""restic backups as a contribution: package, config files, glue, systemd services and timers.

Pure: the same server, target and data paths give the same contribution. Per repository
``<name>``:

- ``/etc/selfhost/backup/<name>.env``: RESTIC_REPOSITORY, RESTIC_PASSWORD_FILE, retention and
  check settings. No secret ever: the password is in ``<name>.password`` (0600 root, written
  from its SecretRef at deploy time);
- ``selfhost-backup-<name>.service`` + ``.timer`` (OnCalendar, RandomizedDelaySec,
  Persistent=true): consistency hooks, backup, then ``forget --prune`` by the retention;
- ``selfhost-backup-check-<name>.service`` + ``.timer``: ``restic check --read-data-subset``;
- every service has ``OnFailure=selfhost-backup-alert@%n.service``, which logs at priority err
  and runs the executables in ``/etc/selfhost/backup/alert.d/`` (the hook for mail);
- ``selfhost-backup-late.timer`` (hourly) logs err when a repository's last success is older
  than its ``max_age_hours``.

What is backed up: the data paths of the enabled services (``DataPath``), then
``backup.extra_paths``. ``DataPath.before_backup`` commands are run first (e.g. SQLite's online
``.backup``), and ``DataPath.stop_units`` are stopped during the backup and started again after.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from selfhost.backup.glue import GLUE
from selfhost.compose.module import Contribution, Env
from selfhost.compose.requests import BackupSource
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit
from selfhost.models.backup import Repository

if TYPE_CHECKING:
    from selfhost.models.server import Server

CONF = "/etc/selfhost/backup"
STATE = "/var/lib/selfhost-backup"
CACHE = "/var/cache/selfhost-backup"
GLUE_PATH = "/usr/local/sbin/selfhost-backup"
UNIT_DIR = "/etc/systemd/system"
HEADER = "# Managed by selfhost: changes here are overwritten on the next deploy.\n"


def password_file(repo: Repository) -> str:
    return f"{CONF}/{repo.name}.password"


def key_file(repo: Repository) -> str:
    return f"{CONF}/{repo.name}.key"


def known_hosts_file(repo: Repository) -> str:
    return f"{CONF}/{repo.name}.known_hosts"


def peer_user(client_hostname: str) -> str:
    """Account on a peer that receives ``client_hostname``'s backups."""
    return f"backup-{client_hostname}"


def sftp_endpoint(server: Server, repo: Repository) -> tuple[str, int, str, str]:
    """(host, port, user, path) of an sftp repository, peer defaults applied."""
    host = repo.host or repo.peer or ""
    user = repo.user or peer_user(server.hostname)
    path = repo.path or ("/data/restic" if repo.peer else "")
    return host, repo.port, user, path


def repository_url(server: Server, repo: Repository) -> str:
    if repo.type == "local":
        return str(repo.path)
    if repo.type == "sftp":
        _, _, _, path = sftp_endpoint(server, repo)
        return f"sftp:selfhost-backup-{repo.name}:{path}"
    if repo.type == "rest":
        return f"rest:{repo.url}"
    return f"rclone:{repo.remote}"


def env_file(server: Server, repo: Repository) -> str:
    """The repository's settings for the glue. Never a secret, only where secrets are."""
    env: list[tuple[str, str]] = [
        ("RESTIC_REPOSITORY", repository_url(server, repo)),
        ("RESTIC_PASSWORD_FILE", password_file(repo)),
        ("RESTIC_CACHE_DIR", CACHE),
        ("SELFHOST_FORGET", " ".join(repo.retention.forget_args())),
        ("SELFHOST_CHECK_SUBSET", repo.check_read_data_subset),
        ("SELFHOST_MAX_AGE_HOURS", str(repo.max_age_hours)),
    ]
    if repo.type == "sftp":
        env.append(("SELFHOST_SFTP_COMMAND",
                    f"ssh -F {CONF}/{repo.name}.ssh_config selfhost-backup-{repo.name} -s sftp"))
    if repo.type == "rest" and repo.rest_user is not None:
        scheme, _, rest = str(repo.url).partition("://")
        env += [("SELFHOST_REST_SCHEME", scheme), ("SELFHOST_REST_USER", repo.rest_user),
                ("SELFHOST_REST_REST", rest),
                ("SELFHOST_REST_PASSWORD_FILE", f"{CONF}/{repo.name}.rest-password")]
    if repo.type == "rclone":
        env.append(("RCLONE_CONFIG", repo.rclone_config))
    return HEADER + "".join(f'{k}="{v}"\n' for k, v in env)


def ssh_config(server: Server, repo: Repository) -> str:
    host, port, user, _ = sftp_endpoint(server, repo)
    return HEADER + "\n".join([
        f"Host selfhost-backup-{repo.name}",
        f"  HostName {host}",
        f"  Port {port}",
        f"  User {user}",
        f"  IdentityFile {key_file(repo)}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {known_hosts_file(repo)}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  HostKeyAlgorithms ssh-ed25519",
        "  BatchMode yes",
        "  ServerAliveInterval 60",
        "  ServerAliveCountMax 240",
    ]) + "\n"


def _service(description: str, exec_start: str, heavy: bool = True) -> str:
    lines = [
        HEADER.rstrip(),
        "[Unit]",
        f"Description={description}",
        "Documentation=man:restic(1)",
        "Wants=network-online.target",
        "After=network-online.target",
        "OnFailure=selfhost-backup-alert@%n.service",
        "",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={exec_start}",
        "SyslogIdentifier=selfhost-backup",
        # restic's ssh child sometimes lingers after restic exits (sftp): once the glue is
        # done, SIGKILL what is left instead of waiting 90 s for it to honour SIGTERM.
        "KillMode=mixed",
    ]
    if heavy:
        lines += ["Nice=10", "IOSchedulingClass=idle", "PrivateTmp=yes"]
    return "\n".join(lines) + "\n"


def _timer(description: str, calendar: str, delay_minutes: int) -> str:
    return "\n".join([
        HEADER.rstrip(),
        "[Unit]",
        f"Description={description}",
        "",
        "[Timer]",
        f"OnCalendar={calendar}",
        f"RandomizedDelaySec={delay_minutes * 60}",
        "Persistent=true",
        "",
        "[Install]",
        "WantedBy=timers.target",
    ]) + "\n"


ALERT_UNIT = HEADER + """[Unit]
Description=selfhost: report the failure of %i

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/selfhost-backup alert %i
SyslogIdentifier=selfhost-backup
"""

LATE_SERVICE = HEADER + """[Unit]
Description=selfhost: alert when a backup is late

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/selfhost-backup late
SyslogIdentifier=selfhost-backup
"""

LATE_TIMER = HEADER + """[Unit]
Description=selfhost: hourly check that backups are not late

[Timer]
OnCalendar=hourly
RandomizedDelaySec=300
Persistent=true

[Install]
WantedBy=timers.target
"""

MAIL_HOOK = """#!/bin/sh
# Managed by selfhost: mail every backup alert to the admin (root is aliased to the admin's
# address; see notify: in the model). Arguments: subject, message.
printf 'To: root\\nSubject: %s\\n\\n%s\\n' "$1" "$2" | /usr/sbin/sendmail -t
"""

ALERT_README = HEADER + """# Executables in this directory run on every backup alert (failed or late backup)
# with two arguments: a subject and a message. Use it to send mail once a mail service exists, e.g.
#   #!/bin/sh
#   printf '%s\\n' "$2" | mail -s "$1" root
"""


def unit_names(repo: Repository) -> dict[str, str]:
    return {
        "service": f"selfhost-backup-{repo.name}.service",
        "timer": f"selfhost-backup-{repo.name}.timer",
        "check_service": f"selfhost-backup-check-{repo.name}.service",
        "check_timer": f"selfhost-backup-check-{repo.name}.timer",
    }


def backup_sets(server: Server, data: list[DataPath]) -> tuple[list[str], list[tuple[str, str]]]:
    """(paths to back up in order, (service, path) pairs) from the data paths and extras."""
    paths: list[str] = []
    owners: list[tuple[str, str]] = []
    for d in data:
        if d.path not in paths:
            paths.append(d.path)
        owners.append((d.service, d.path))
    for p in server.backup.extra_paths:
        if p not in paths:
            paths.append(p)
        owners.append(("extra", p))
    return paths, owners


def pre_backup_script(data: list[DataPath]) -> str:
    out = [HEADER.rstrip(), "# Consistency hooks of the services' data, run before each backup."]
    for d in data:
        if d.before_backup:
            out += [f"# {d.service}: {d.path}", d.before_backup]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class DataPath:
    """A backup source as the glue sees it: the path, the service it belongs to (for
    ``selfhost restore --service``), its consistency hooks."""

    path: str
    service: str
    before_backup: str | None = None
    stop_units: tuple[str, ...] = ()


def data_paths(sources: list[BackupSource]) -> list[DataPath]:
    out = []
    for s in sources:
        parts = s.origin.split(".")
        service = parts[1] if parts[0] == "services" and len(parts) > 1 else parts[0]
        out.append(DataPath(s.path, service, s.before, s.stop_units))
    return out


def contribute(env: Env) -> Contribution:
    """Everything the backup policy adds to the server (nothing when it is not active)."""
    server = env.server
    policy = server.backup
    c = Contribution()
    if not policy.active:
        return c
    data = data_paths(env.incoming(BackupSource))
    c.packages.append("restic")
    types = {r.type for r in policy.repositories}
    if "sftp" in types:
        c.packages += ["openssh-client", "procps"]  # procps: pgrep, used by the glue
    if "rclone" in types:
        c.packages.append("rclone")

    c.directories += [
        ManagedDir("/etc/selfhost", "0755"),
        ManagedDir(CONF, "0700"),
        ManagedDir(f"{CONF}/alert.d", "0700"),
        ManagedDir(STATE, "0700"),
        ManagedDir(CACHE, "0700"),
    ]
    paths, owners = backup_sets(server, data)
    stop_units: list[str] = []
    for d in data:
        stop_units += [u for u in d.stop_units if u not in stop_units]
    conf_files = {
        f"{CONF}/repositories": "".join(r.name + "\n" for r in policy.repositories),
        f"{CONF}/include.txt": "".join(p + "\n" for p in paths),
        f"{CONF}/exclude.txt": "".join(p + "\n" for p in policy.exclude),
        f"{CONF}/services.txt": "".join(f"{s}\t{p}\n" for s, p in owners),
        f"{CONF}/stop-units.txt": "".join(u + "\n" for u in stop_units),
        f"{CONF}/pre-backup.sh": pre_backup_script(data),
        f"{CONF}/alert.d/README": ALERT_README,
    }
    for path, content in conf_files.items():
        c.files.append(ManagedFile(path, content, mode="0600"))
    if env.has_sendmail():
        c.files.append(ManagedFile(f"{CONF}/alert.d/50-mail", MAIL_HOOK, mode="0700"))
    c.files.append(ManagedFile(GLUE_PATH, GLUE, mode="0755",
                               validate="bash -n {path}"))

    unit_files: dict[str, str] = {
        "selfhost-backup-alert@.service": ALERT_UNIT,
        "selfhost-backup-late.service": LATE_SERVICE,
        "selfhost-backup-late.timer": LATE_TIMER,
    }
    timers: list[str] = ["selfhost-backup-late.timer"]
    for repo in policy.repositories:
        repo = _with_peer_address(env, repo)
        names = unit_names(repo)
        c.files.append(ManagedFile(f"{CONF}/{repo.name}.env", env_file(server, repo),
                                   mode="0600"))
        c.files.append(ManagedFile(password_file(repo), "", mode="0600", secret=repo.password))
        if repo.rest_password is not None:
            c.files.append(ManagedFile(f"{CONF}/{repo.name}.rest-password", "", mode="0600",
                                       secret=repo.rest_password))
        if repo.type == "sftp":
            c.files.append(ManagedFile(f"{CONF}/{repo.name}.ssh_config",
                                       ssh_config(server, repo), mode="0600"))
            c.files += sftp_identity(env, repo)
        unit_files[names["service"]] = _service(
            f"selfhost: back up to restic repository {repo.name}",
            f"{GLUE_PATH} run {repo.name}")
        unit_files[names["timer"]] = _timer(
            f"selfhost: back up to {repo.name} ({repo.schedule})", repo.schedule,
            repo.randomized_delay_minutes)
        unit_files[names["check_service"]] = _service(
            f"selfhost: check restic repository {repo.name}", f"{GLUE_PATH} check {repo.name}")
        unit_files[names["check_timer"]] = _timer(
            f"selfhost: check {repo.name} ({repo.check_schedule})", repo.check_schedule,
            max(repo.randomized_delay_minutes, 60))
        timers += [names["timer"], names["check_timer"]]
        c.commands.append(Command(
            f"backup {repo.name}: start the late-backup clock",
            f"mkdir -p {STATE} && date +%s > {STATE}/{repo.name}.since",
            unless=f"test -e {STATE}/{repo.name}.since",
        ))

    for name, content in unit_files.items():
        calendar = _calendar_of(content)
        validate = (f"systemd-analyze calendar {shlex.quote(calendar)} >/dev/null"
                    if calendar else None)
        c.files.append(ManagedFile(f"{UNIT_DIR}/{name}", content, validate=validate))
    c.commands.append(Command(
        "backup: reload systemd units",
        "systemctl daemon-reload",
        on_change=tuple(f"{UNIT_DIR}/{n}" for n in unit_files),
    ))
    for t in timers:
        c.units.append(Unit(t, reload_on=(f"{UNIT_DIR}/{t}",), reload=False))
    return c


def _with_peer_address(env: Env, repo: Repository) -> Repository:
    """A peer repository without ``host``: reached at the peer's first address in the fleet
    (LAN, then VPN, then public), else its FQDN."""
    if repo.type != "sftp" or repo.peer is None or repo.host is not None:
        return repo
    name = env.fleet.find(repo.peer)
    if name is None:
        return repo
    peer = env.fleet.hosts[name]
    a = peer.addresses
    addrs = [str(x) for x in (*a.lan, *a.vpn, *a.public)]
    return repo.model_copy(update={"host": addrs[0] if addrs else peer.fqdn})


def sftp_identity(env: Env, repo: Repository) -> list[ManagedFile]:
    """The repository's SSH private key (from the controller's key store, uploaded as a
    secret) and its known_hosts entry (a peer's host key is read from the peer at deploy
    time; another host's comes from ``host_key``)."""
    out: list[ManagedFile] = []
    from selfhost.backup.fleet import key_path

    host, port, _, _ = sftp_endpoint(env.server, repo)
    path = str(key_path(env.server, repo))
    if env.keys is not None:
        env.keys.public_key(path)  # make sure the pair exists before the deploy reads it
    out.append(ManagedFile(key_file(repo), "", mode="0600", secret_file=path))
    if repo.peer is not None:
        peer = env.fleet.find(repo.peer) or repo.peer
        out.append(ManagedFile(known_hosts_file(repo), "", mode="0600",
                               host_key_of=(peer, host, port)))
    elif repo.host_key:
        from selfhost.backup.fleet import known_hosts_line

        out.append(ManagedFile(known_hosts_file(repo), known_hosts_line(host, port, repo.host_key),
                               mode="0600"))
    return out


def _calendar_of(unit: str) -> str | None:
    for line in unit.splitlines():
        if line.startswith("OnCalendar="):
            return line.removeprefix("OnCalendar=")
    return None
