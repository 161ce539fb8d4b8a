"""The ``selfhost`` command: check a server description, show its plan, print its schema.

Exit status: 0 when everything is fine, 2 when a file is invalid (every problem is printed on
standard error as ``FILE:LINE:COL: field.path: message``), 1 on an internal error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from selfhost.compile.target import RELEASES

if TYPE_CHECKING:
    from selfhost.models.fleet import Fleet

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INVALID = 2

DEFAULT_SCHEMA_PATH = Path("schema/selfhost.schema.json")


def _err(line: str) -> None:
    print(line, file=sys.stderr)


def _load(file: str, debug: bool) -> Fleet | int:
    """Load and validate ``file`` (a fleet, or one server). If it is invalid, print its
    problems and return the exit status instead. Warnings are printed too."""
    from selfhost.config import ConfigError, Issue, load_fleet

    try:
        fleet = load_fleet(file)
        for warning in fleet.warnings:
            _err(warning.format())
        return fleet
    except ConfigError as exc:
        for issue in exc.issues:
            _err(issue.format())
        return EXIT_INVALID
    except Exception as exc:  # a bug, not bad input: say so without a traceback
        if debug:
            raise
        _err(Issue(file, 1, 1, "-", f"internal error: {type(exc).__name__}: {exc} "
                                    "(run with --debug for a traceback)").format())
        return EXIT_INTERNAL


def cmd_validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for file in args.files:
        result = _load(file, args.debug)
        if isinstance(result, int):
            status = max(status, result)
        else:
            hosts = "" if len(result.hosts) == 1 else f" ({len(result.hosts)} hosts)"
            print(f"{file}: ok{hosts}")
    return status


def _host(fleet: Fleet, file: str, name: str | None) -> str | int:
    """The fleet host called ``name`` (or the only one), else an error printed."""
    if name is None:
        if len(fleet.hosts) == 1:
            return next(iter(fleet.hosts))
        _err(f"{file}: describes {len(fleet.hosts)} hosts ({', '.join(fleet.hosts)}): "
             "choose one with --host")
        return EXIT_INVALID
    found = fleet.find(name)
    if found is None:
        _err(f"{file}: no host {name!r} (hosts: {', '.join(fleet.hosts)})")
        return EXIT_INVALID
    return found


def _targets(args: argparse.Namespace, fleet: Fleet
             ) -> dict[str, tuple[str | None, str | None]] | int:
    """Which container or SSH destination each host is, from ``--podman``/``--ssh``: NAME
    (the only or ``--host`` host) or HOST=NAME, repeated for a fleet. Host -> (podman, ssh)."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for kind, values in (("podman", args.podman or []), ("ssh", args.ssh or [])):
        for value in values:
            name, sep, where = value.partition("=")
            if not sep:
                one = _host(fleet, args.file, args.host)
                if isinstance(one, int):
                    return one
                name, where = one, value
            found = fleet.find(name)
            if found is None:
                _err(f"{args.file}: no host {name!r} (hosts: {', '.join(fleet.hosts)})")
                return EXIT_INVALID
            out[found] = (where, None) if kind == "podman" else (None, where)
    return out


def _target_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("file", metavar="FILE", help="YAML server or fleet description")
    p.add_argument("--podman", metavar="[HOST=]NAME", action="append",
                   help=f"{what} a local podman container (HOST=NAME for each host of a fleet)")
    p.add_argument("--ssh", metavar="[HOST=]USER@ADDR", action="append",
                   help=f"{what} a host reached with ssh (and sudo)")
    p.add_argument("--port", type=int, help="SSH port")
    p.add_argument("--host", metavar="NAME", help="which host of a fleet the target is")


def _load_host(args: argparse.Namespace) -> tuple[Fleet, str] | int:
    """The model of ``args.file`` and the host ``args.host`` names (or its only host); an
    exit status when either is wrong (the problems are printed)."""
    fleet = _load(args.file, args.debug)
    if isinstance(fleet, int):
        return fleet
    me = _host(fleet, args.file, args.host)
    return me if isinstance(me, int) else (fleet, me)


def cmd_plan(args: argparse.Namespace) -> int:
    from selfhost.compile import Target, compile_fleet
    from selfhost.config import Issue

    fleet = _load(args.file, args.debug)
    if isinstance(fleet, int):
        return fleet
    hosts = list(fleet.hosts)
    if args.host is not None:
        one = _host(fleet, args.file, args.host)
        if isinstance(one, int):
            return one
        hosts = [one]
    try:
        plans = compile_fleet(fleet, {h: Target(release=args.release) for h in hosts},
                              hosts=hosts)
    except ValueError as exc:  # a conflict the model could not see (two writers of a file)
        if args.debug:
            raise
        _err(Issue(args.file, 1, 1, "-", f"cannot compile a plan: {exc}").format())
        return EXIT_INVALID
    if args.json:
        data = {h: p.to_data() for h, p in plans.items()}
        print(json.dumps(data[hosts[0]] if len(fleet.hosts) == 1 else data, indent=2))
    else:
        sys.stdout.write("\n".join(p.render() for p in plans.values()))
    return EXIT_OK


def schema_text() -> str:
    """The JSON Schema of a server description, as written to the schema file."""
    from selfhost.config import server_json_schema

    return json.dumps(server_json_schema(), indent=2, ensure_ascii=False) + "\n"


def cmd_schema(args: argparse.Namespace) -> int:
    text = schema_text()
    if args.output is None or args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        _err(f"selfhost schema: cannot write {out}: {exc.strerror or exc}")
        return EXIT_INTERNAL
    _err(f"wrote {out}")
    return EXIT_OK


def cmd_listening(args: argparse.Namespace) -> int:
    """List sockets on the target that the model does not account for (exit 1 if any)."""
    from selfhost.audit import SS_COMMAND, is_loopback, parse_ss, runner, unaccounted
    from selfhost.compile import Target, compile_fleet

    loaded = _load_host(args)
    if isinstance(loaded, int):
        return loaded
    fleet, me = loaded
    run = runner(podman=args.podman, ssh=args.ssh, ssh_port=args.port)
    try:
        lines = run(f". /etc/os-release; echo \"$VERSION_CODENAME\"; {SS_COMMAND}")
        release = lines[0].strip() if lines else ""
        sockets = parse_ss("\n".join(lines[1:]))
    except (RuntimeError, OSError) as exc:
        _err(f"selfhost listening: {exc}")
        return EXIT_INTERNAL
    target = Target(release=release if release in RELEASES else "bookworm")
    plan = compile_fleet(fleet, {me: target}, hosts=[me])[me]
    extra = unaccounted(plan, sockets)
    public = [s for s in sockets if s not in extra]
    for sock in sorted(public, key=lambda s: (s.port, s.proto)):
        print(f"{'internal' if is_loopback(sock.address) else 'ok':11} {sock.describe()}")
    for sock in extra:
        print(f"UNACCOUNTED {sock.describe()}")
    print(f"{len(extra)} listening socket(s) not accounted for by {args.file}")
    return 1 if extra else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Drift and health of a target (or of every host of a fleet), in one round trip each."""
    from selfhost.audit import runner
    from selfhost.check import (
        EXIT_UNCHECKED,
        check_host,
        exit_code,
        exposure,
        probe_script,
        render,
        to_json,
    )
    fleet = _load(args.file, args.debug)
    if isinstance(fleet, int):
        return fleet
    targets = _targets(args, fleet)
    if isinstance(targets, int):
        return targets
    if not targets:
        _err("selfhost check: give --podman or --ssh")
        return EXIT_INVALID
    if bool(args.probe_from) != bool(args.probe_address):
        _err("selfhost check: --probe-from and --probe-address go together")
        return EXIT_INVALID
    status = 0
    reports = []
    for me, (podman, ssh) in targets.items():
        try:
            found_, plan = check_host(fleet, me, runner(podman=podman, ssh=ssh,
                                                        ssh_port=args.port))
            if args.probe_from:
                probe = runner(podman=args.probe_from)
                from selfhost.check import COMMON_PORTS

                ports = sorted({*COMMON_PORTS, *(p.port for p in plan.ports)})
                found_ += exposure(plan, args.probe_address,
                                   probe(probe_script(args.probe_address, ports)))
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            if args.debug:
                raise
            _err(f"selfhost check: {me}: could not check: {exc}")
            status = max(status, EXIT_UNCHECKED)
            continue
        status = max(status, exit_code(found_))
        reports.append(to_json(me, found_) if args.json else render(me, found_))
    print(("\n" if args.json else "").join(reports), end="" if not args.json else "\n")
    return status


def cmd_dns(args: argparse.Namespace) -> int:
    """Print the DNS records the model asks to publish, as zone-file lines per zone."""
    from selfhost.audit import runner
    from selfhost.dns import fleet_records, read_values, render

    fleet = _load(args.file, args.debug)
    if isinstance(fleet, int):
        return fleet
    targets = _targets(args, fleet)
    if isinstance(targets, int):
        return targets
    runners = {h: runner(podman=podman, ssh=ssh, ssh_port=args.port)
               for h, (podman, ssh) in targets.items()}
    records = fleet_records(fleet)
    try:
        values = read_values(records, runners)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        if args.debug:
            raise
        _err(f"selfhost dns: cannot read the values made on the hosts: {exc}")
        return EXIT_INTERNAL
    sys.stdout.write(render(fleet, args.file, records, values, zone_file=args.zone_file))
    return EXIT_OK


def cmd_held(args: argparse.Namespace) -> int:
    """List the mail held over an outbound limit per sender; release or delete it."""
    from selfhost.audit import runner
    from selfhost.held import act, read, render

    fleet = _load(args.file, args.debug)
    if isinstance(fleet, int):
        return fleet
    targets = _targets(args, fleet)
    if isinstance(targets, int):
        return targets
    if not targets:
        _err("selfhost held: give --podman or --ssh")
        return EXIT_INVALID
    status = EXIT_OK
    for me, (podman, ssh) in targets.items():
        if getattr(fleet.hosts[me].services, "mail", None) is None:
            _err(f"{args.file}: {me} has no services.mail")
            return EXIT_INVALID
        run = runner(podman=podman, ssh=ssh, ssh_port=args.port)
        try:
            mail = read(run, args.user)
            done = act(run, mail, args.release or [], args.delete or [])
            if done:
                print("\n".join(done))
                mail = read(run, args.user)
            sys.stdout.write(render(me, mail))
        except ValueError as exc:
            _err(f"selfhost held: {me}: {exc}")
            status = EXIT_INVALID
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            if args.debug:
                raise
            _err(f"selfhost held: {me}: {exc}")
            status = EXIT_INTERNAL
    return status


def cmd_vpn_peer(args: argparse.Namespace) -> int:
    """Print a VPN peer's WireGuard configuration (and a QR code for the app)."""
    import shutil

    loaded = _load_host(args)
    if isinstance(loaded, int):
        return loaded
    fleet, me = loaded
    server = fleet.hosts[me]
    wg = server.services.wireguard
    if wg is None:
        _err(f"{args.file}: {me} has no services.wireguard")
        return EXIT_INVALID
    if args.name not in {p.name for p in wg.peers}:
        _err(f"{args.file}: no VPN peer {args.name!r} (peers: "
             f"{', '.join(p.name for p in wg.peers) or 'none'})")
        return EXIT_INVALID
    public = "<the server's public key: run this command with --podman or --ssh>"
    if args.podman or args.ssh:
        from selfhost.audit import runner

        run = runner(podman=args.podman, ssh=args.ssh, ssh_port=args.port)
        try:
            # Only the public key is derived on the server; the private key never leaves it.
            out = run(f"wg pubkey < /etc/wireguard/{wg.interface}.key")
        except (RuntimeError, OSError) as exc:
            _err(f"selfhost vpn-peer: cannot read the server's public key: {exc}")
            return EXIT_INTERNAL
        public = out[0].strip() if out else public
    text = wg.peer_config(server.fqdn, args.name, public)
    sys.stdout.write(text)
    if args.qr and shutil.which("qrencode"):
        subprocess.run(["qrencode", "-t", "ansiutf8"], input=text, text=True, check=False)
    elif args.qr:
        _err("(install Debian's qrencode for a QR code)")
    return EXIT_OK


def cmd_rehearse(args: argparse.Namespace) -> int:
    """Converge the model into disposable Debian 12 and 13 containers, check idempotence and
    run `selfhost check` there (Molecule scenario `rehearse` of this repository)."""
    import os

    loaded = _load_host(args)
    if isinstance(loaded, int):
        return loaded
    _, me = loaded
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "molecule" / "rehearse" / "molecule.yml").is_file():
        _err("selfhost rehearse: needs a clone of the selfhost repository (its Molecule "
             "scenario molecule/rehearse and its image builder)")
        return EXIT_INTERNAL
    bindir = Path(sys.executable).parent
    env = {**os.environ, "SELFHOST_CONFIG": str(Path(args.file).resolve()),
           "SELFHOST_HOST": me, "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
           "ANSIBLE_HOME": str(repo / ".cache" / "ansible")}
    done = subprocess.run([str(bindir / "molecule"), "test", "-s", "rehearse"], cwd=repo,
                          env=env, check=False)
    return done.returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfhost",
        description="Describe a home server as typed data, check it, and see what a deploy "
        "would do.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show a traceback on internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check server descriptions and report every problem",
                       description="Check YAML server descriptions. Prints 'FILE: ok' for a "
                       "valid file, else every problem as FILE:LINE:COL: field.path: message "
                       "(exit status 2).")
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML file(s) to check")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show what a deploy of a server description would do",
                       description="Validate FILE, then print the plan compiled from it (every host's, for "
        "a fleet).")
    p.add_argument("file", metavar="FILE", help="YAML server or fleet description")
    p.add_argument("--release", choices=RELEASES, default="bookworm",
                   help="Debian release of the target (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON data")
    p.add_argument("--host", metavar="NAME", help="only this host of a fleet")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("schema", help="print the JSON Schema of a server description",
                       description="Print the JSON Schema of a server description (for "
                       "editors using yaml-language-server), or write it to a file.")
    p.add_argument("-o", "--output", metavar="PATH",
                   help=f"write the schema to PATH (e.g. {DEFAULT_SCHEMA_PATH}) instead of "
                   "printing it")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("listening", help="list sockets on a target the model does not account for",
                       description="Run `ss` on the target and report every socket reachable "
                       "from the network that no port of the model explains (exit status 1 if "
                       "any). Loopback-only sockets are internal and not reported.")
    p.add_argument("file", metavar="FILE", help="YAML server description")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--podman", metavar="NAME", help="a local podman container")
    where.add_argument("--ssh", metavar="USER@HOST", help="a host reached with ssh (and sudo)")
    p.add_argument("--port", type=int, help="SSH port")
    p.add_argument("--host", metavar="NAME", help="which host of a fleet the target is")
    p.set_defaults(func=cmd_listening)

    p = sub.add_parser("check", help="is the server still what the model says, and healthy?",
                       description="Read the target in one round trip and report drift (what "
                       "a deploy would change, with a diff of file contents; secrets are never "
                       "read) and health (failed units, disks, memory, pending updates and "
                       "reboot, time sync, each service's health checks, listening sockets the "
                       "model does not explain). Exit status: 0 all good, 1 warnings, 2 drift "
                       "or failures, 3 could not check.")
    _target_arguments(p, "check")
    p.add_argument("--probe-from", metavar="CONTAINER",
                   help="exposure: probe the host's TCP ports from this podman container (a "
                   "second fleet host or a client on the same network)")
    p.add_argument("--probe-address", metavar="ADDRESS",
                   help="the host's address as the probing container reaches it")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("dns", help="print the DNS records to publish, as zone-file lines",
                       description="Print the DNS records the model's services ask for (the "
                       "hosts' A/AAAA, web names and CAA, mail's MX, SPF, DKIM, DMARC...), as "
                       "zone-file lines grouped by zone, to paste at a DNS provider. Values made "
                       "on a host (a DKIM public key) are read there with --podman or --ssh; "
                       "without, they are printed commented out with a note.")
    _target_arguments(p, "read values made on the hosts from")
    p.add_argument("--zone-file", action="store_true",
                   help="whole zones (with $TTL, a placeholder SOA and NS): for named-checkzone "
                   "or an authoritative server")
    p.set_defaults(func=cmd_dns)

    p = sub.add_parser("held", help="list, release or delete mail held over an outbound limit",
                       description="List the mail the host's Postfix holds over an outbound "
                       "limit (its hold queue), per sender, with the PHP script that sent it; "
                       "release a message (delivered at once) or delete it. Held mail stays "
                       "until then, across restarts.")
    _target_arguments(p, "act on")
    p.add_argument("--user", metavar="U", help="only this sender (an address, or a local "
                   "login: LOGIN@server)")
    p.add_argument("--release", metavar="ID", action="append",
                   help="release this held message (a queue ID, or 'all' of the listed ones)")
    p.add_argument("--delete", metavar="ID", action="append",
                   help="delete this held message (a queue ID, or 'all' of the listed ones)")
    p.set_defaults(func=cmd_held)

    p = sub.add_parser("vpn-peer", help="print a VPN peer's WireGuard configuration",
                       description="Print the WireGuard configuration of a peer (a laptop, a "
                       "phone) of the model's VPN, with a QR code for the app. The server's "
                       "public key is read from the server with --podman or --ssh; the "
                       "device's private key stays on the device.")
    p.add_argument("file", metavar="FILE", help="YAML server or fleet description")
    p.add_argument("name", metavar="NAME", help="the peer's name in the model")
    p.add_argument("--host", metavar="NAME", help="which host of a fleet runs the VPN")
    p.add_argument("--podman", metavar="NAME", help="read the server's key from this container")
    p.add_argument("--ssh", metavar="USER@HOST", help="read the server's key over ssh (sudo)")
    p.add_argument("--port", type=int, help="SSH port")
    p.add_argument("--no-qr", dest="qr", action="store_false", help="no QR code")
    p.set_defaults(func=cmd_vpn_peer)

    p = sub.add_parser("rehearse", help="try a model in disposable Debian 12 and 13 containers",
                       description="Converge FILE into disposable Debian 12 and 13 containers "
                       "(built locally), check that a second converge changes nothing, run "
                       "`selfhost check` there, and destroy them: a change is tried before it "
                       "reaches the real server. Needs podman and this repository's test tools "
                       "(scripts/setup).")
    p.add_argument("file", metavar="FILE", help="YAML server or fleet description")
    p.add_argument("--host", metavar="NAME", help="which host of a fleet to rehearse")
    p.set_defaults(func=cmd_rehearse)

    from selfhost.backup.cli import add_subcommands as add_backup_subcommands

    add_backup_subcommands(sub)  # backup-status, restore
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `selfhost plan f | head`: the reader left, nothing to report
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
