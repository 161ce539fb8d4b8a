"""Figure 4 of bench/run: validation + compile time and peak memory of generated models.

    .venv/bin/python bench/compile_bench.py --runs 3 --sites 10,100,200,1000 --servers 10,100,1000

Prints one JSON object on stdout. Models are generated from examples/home.yaml (parsed once,
outside the measurement):

- ``sites``: ONE server whose web service has N sites (host s0..sN-1, each uploaded from
  examples/site) -> ``Server.model_validate`` + ``compile_server``;
- ``servers``: N servers, copies of the example with host names h0..hN-1 -> N validations
  and N compiles, all plans kept (as a fleet deploy keeps them).

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

from selfhost.compile import Target, compile_server  # noqa: E402
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


def gen_servers(base: dict[str, Any], n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        d = copy.deepcopy(base)
        d["hostname"] = f"h{i}"
        out.append(d)
    return out


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
    ap.add_argument("--mem-max-servers", type=int, default=None,
                    help="skip the (slow, tracemalloc) memory run above this many servers")
    a = ap.parse_args()
    base = base_model()
    work([base])  # warm up imports and pydantic's schema building once
    out: dict[str, Any] = {"sites": {}, "servers": {}}
    for n in (int(x) for x in a.sites.split(",") if x):
        r = measure(gen_sites(base, n), a.runs)
        out["sites"][str(n)] = {**r, "per_item_s": r["median_s"] / n}
    for n in (int(x) for x in a.servers.split(",") if x):
        mem = a.mem_max_servers is None or n <= a.mem_max_servers
        r = measure(gen_servers(base, n), a.runs, memory=mem)
        out["servers"][str(n)] = {**r, "per_item_s": r["median_s"] / n}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
