"""Figure 4 of bench/run: validation + compile time and peak memory of generated models.

    .venv/bin/python bench/compile_bench.py --runs 3 --sites 10,100,200,1000 --servers 10,100,1000

Prints one JSON object on stdout. Models are generated from examples/home.yaml (parsed once,
outside the measurement):

- ``sites``: ONE server whose web service has N sites (host s0..sN-1, each uploaded from
  examples/site) -> ``Server.model_validate`` + ``compile_server``;
- ``servers``: N servers, copies of the example with host names h0..hN-1 -> N validations
  and N compiles, all plans kept (as a fleet deploy keeps them);
- ``fleet``: ONE fleet file of N hosts (what ``selfhost validate`` + ``selfhost plan`` do for
  it): ``defaults:`` holds the shared domain, time zone and admins, each host is the example's
  server with its own host name and LAN address, and every 10th host backs up to the next host with an sftp
  ``peer`` (as examples/backup.yaml) -> ``load_fleet_text`` of the YAML text (parsing,
  defaults, Pydantic validation, ``validate_fleet``) + ``compile_fleet`` of every host;
- ``members``: ONE association server (examples/association.yaml) with N members, half of them
  with a PHP site and a database, half with a static site -> validation + compile.

Time is the median of ``--runs`` runs (wall clock, perf_counter). Peak memory is measured in a
separate run under tracemalloc (which slows Python down): the peak of Python allocations during
validation + compile, above what was allocated before it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

# bench/bench.py runs this with PYTHONPATH set to its copy of the code (see snapshot_code).
ROOT = Path(os.environ.get("BENCH_SRC") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from ruamel.yaml import YAML  # noqa: E402

from selfhost.compile import Target, compile_fleet, compile_server  # noqa: E402
from selfhost.config import load_fleet_text  # noqa: E402
from selfhost.models import Server  # noqa: E402

EXAMPLE = ROOT / "examples" / "home.yaml"
TARGET = Target(release="bookworm", in_container=False)


def base_model() -> dict[str, Any]:
    data = YAML(typ="safe").load(EXAMPLE.read_text())
    assert isinstance(data, dict)
    return data


def gen_sites(base: dict[str, Any], n: int) -> list[dict[str, Any]]:
    d = copy.deepcopy(base)
    site = dict(d["services"]["web"]["sites"][0])
    d["services"]["web"]["sites"] = [{**site, "host": f"s{j}"} for j in range(n)]
    return [d]


ASSOCIATION = ROOT / "examples" / "association.yaml"


def gen_members(n: int) -> list[dict[str, Any]]:
    """ONE server of examples/association.yaml with ``n`` members: every other member on the
    "php" plan (a PHP site, a database, a mailbox with an alias and the plan's mail limits),
    the others on "small" (a static site, a mailbox)."""
    d = YAML(typ="safe").load(ASSOCIATION.read_text())
    members = []
    for j in range(n):
        if j % 2 == 0:
            members.append({"name": f"m{j}", "email": f"contact@m{j}.example", "plan": "php",
                            "sites": [{"domain": f"m{j}.asso.example", "php": True}],
                            "databases": [f"m{j}_site"],
                            "database_password": {"env": "ASSO_BENCH_DB_PASSWORD"},
                            "mailboxes": [f"m{j}"], "aliases": [f"webmaster-m{j}"],
                            "password": {"env": "ASSO_BENCH_PASSWORD"}})
        else:
            members.append({"name": f"m{j}", "email": f"contact@m{j}.example",
                            "sites": [{"domain": f"m{j}.asso.example"}],
                            "mailboxes": [f"m{j}"], "password": {"env": "ASSO_BENCH_PASSWORD"}})
    d["services"]["association"]["members"] = members
    return [d]


def gen_servers(base: dict[str, Any], n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        d = copy.deepcopy(base)
        d["hostname"] = f"h{i}"
        out.append(d)
    return out


FLEET_SHARED = ("domain", "timezone", "admins")


def gen_fleet(base: dict[str, Any], n: int, addresses: bool = False) -> str:
    """The YAML text of a fleet of ``n`` hosts h0..hN-1 (see the module's docstring). The
    backup peers have a public address (as examples/backup.yaml's friend); with
    ``addresses``, every host also has a LAN address."""
    import io

    own = {k: v for k, v in base.items() if k not in FLEET_SHARED}
    hosts: dict[str, Any] = {}
    for i in range(n):
        h = copy.deepcopy(own)
        h["hostname"] = f"h{i}"
        if addresses:
            h["addresses"] = {"lan": [f"192.168.{i // 250}.{i % 250 + 1}"]}
        if i % 10 == 1:
            h.setdefault("addresses", {})["public"] = [f"203.0.{i // 250}.{i % 250 + 1}"]
        if i % 10 == 0 and i + 1 < n:
            h["backup"] = {"repositories": [{
                "name": "offsite", "type": "sftp", "peer": f"h{i + 1}",
                "password": {"env": "SELFHOST_BACKUP_BENCH_PASSWORD"}, "schedule": "daily"}]}
        hosts[f"h{i}"] = h
    data = {"defaults": {k: base[k] for k in FLEET_SHARED if k in base}, "hosts": hosts}
    buf = io.StringIO()
    y = YAML()
    y.default_flow_style = False
    y.dump(data, buf)
    return buf.getvalue()


def work_fleet(text: str) -> dict[str, Any]:
    fleet = load_fleet_text(text, "fleet.yaml", base_dir=EXAMPLE.parent)
    return compile_fleet(fleet, {h: TARGET for h in fleet.hosts})


def measure_fleet(text: str, runs: int, memory: bool = True) -> dict[str, Any]:
    """Like :func:`measure`, for one fleet file; also times loading (parse + validate) alone."""
    times, load_times, cpu_times = [], [], []
    steps = hosts = 0
    for _ in range(runs):
        gc.collect()
        c0 = time.process_time()
        t0 = time.perf_counter()
        fleet = load_fleet_text(text, "fleet.yaml", base_dir=EXAMPLE.parent)
        t1 = time.perf_counter()
        plans = compile_fleet(fleet, {h: TARGET for h in fleet.hosts})
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        load_times.append(t1 - t0)
        steps, hosts = sum(len(p.steps) for p in plans.values()), len(plans)
        del plans, fleet
    result = {"times_s": times, "median_s": statistics.median(times),
              "load_median_s": statistics.median(load_times),
              # CPU time of this process: less exposed than wall time to others' load.
              "cpu_times_s": cpu_times, "cpu_median_s": statistics.median(cpu_times),
              "plan_steps": steps, "hosts": hosts, "yaml_bytes": len(text), "peak_bytes": None}
    if not memory:
        return result
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    plans = work_fleet(text)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del plans
    return {**result, "peak_bytes": peak - before}


def work(models: list[dict[str, Any]]) -> list[Any]:
    plans = []
    for m in models:
        s = Server.model_validate(m).with_base_dir(EXAMPLE.parent)
        plans.append(compile_server(s, TARGET))
    return plans


def measure(models: list[dict[str, Any]], runs: int, memory: bool = True) -> dict[str, Any]:
    times = []
    steps = 0
    for _ in range(runs):
        inputs = copy.deepcopy(models)  # validation must not see already-validated objects
        gc.collect()
        t0 = time.perf_counter()
        plans = work(inputs)
        times.append(time.perf_counter() - t0)
        steps = sum(len(p.steps) for p in plans)
        del plans
    result = {"times_s": times, "median_s": statistics.median(times), "plan_steps": steps,
              "peak_bytes": None}
    if not memory:
        return result
    inputs = copy.deepcopy(models)
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    plans = work(inputs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del plans
    return {**result, "peak_bytes": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sites", default="10,100,200,1000")
    ap.add_argument("--servers", default="10,100,1000")
    ap.add_argument("--fleet", default="50,100,200,400",
                    help="host counts of the generated fleet files")
    ap.add_argument("--members", default="",
                    help="member counts of one association server (examples/association.yaml)")
    ap.add_argument("--mem-max-servers", type=int, default=None,
                    help="skip the (slow, tracemalloc) memory run above this many servers")
    a = ap.parse_args()
    base = base_model()
    work([base])  # warm up imports and pydantic's schema building once
    os.environ.setdefault("SELFHOST_BACKUP_BENCH_PASSWORD", "bench-only-not-a-secret-1")
    work_fleet(gen_fleet(base, 2))
    os.environ.setdefault("ASSO_BENCH_DB_PASSWORD", "bench-only-not-a-secret-2")
    os.environ.setdefault("SELFHOST_BACKUP_USB_PASSWORD", "bench-only-not-a-secret-3")
    out: dict[str, Any] = {"sites": {}, "servers": {}, "fleet": {}, "members": {}}
    for n in (int(x) for x in a.sites.split(",") if x):
        r = measure(gen_sites(base, n), a.runs)
        out["sites"][str(n)] = {**r, "per_item_s": r["median_s"] / n}
    for n in (int(x) for x in a.servers.split(",") if x):
        mem = a.mem_max_servers is None or n <= a.mem_max_servers
        r = measure(gen_servers(base, n), a.runs, memory=mem)
        out["servers"][str(n)] = {**r, "per_item_s": r["median_s"] / n}
    for n in (int(x) for x in a.fleet.split(",") if x):
        mem = a.mem_max_servers is None or n <= a.mem_max_servers
        r = measure_fleet(gen_fleet(base, n), a.runs, memory=mem)
        out["fleet"][str(n)] = {**r, "per_item_s": r["median_s"] / n}
    for n in (int(x) for x in a.members.split(",") if x):
        r = measure(gen_members(n), a.runs)
        out["members"][str(n)] = {**r, "per_item_s": r["median_s"] / n}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
