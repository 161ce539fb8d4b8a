"""Run the pyinfra CLI with light instrumentation, for bench/bench.py.

    BENCH_PROBE_LOG=out.json python bench/probe.py <pyinfra arguments...>

Behaves exactly like ``pyinfra`` and, at exit, writes to ``$BENCH_PROBE_LOG``:

- the wall-clock intervals of pyinfra's phases (python start-up and imports, inventory,
  connect, prepare = executing the deploy file, which is where this deploy gathers its facts,
  execute = running the operations, disconnect/results);
- every command sent to a target (``Host.run_shell_command``/``put_file``/``get_file``) with
  its host, start/end time and whether it was issued while gathering a fact.

Wrapping these functions costs microseconds per call; nothing else in pyinfra is changed.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before pyinfra is imported

import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import pyinfra.api.facts as _facts  # noqa: E402
import pyinfra.api.operations as _operations  # noqa: E402
import pyinfra_cli.cli as _cli  # noqa: E402
from pyinfra.api.host import Host  # noqa: E402
from pyinfra_cli.main import main  # noqa: E402

T_IMPORTED = time.perf_counter()
LOG: dict[str, Any] = {"phases": [], "commands": [], "facts": [], "op_steps": [],
                       "host_ops": []}
_in_fact: dict[Any, bool] = {}


def _now() -> float:
    return time.perf_counter() - T_START


def _phase(name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = _now()
        try:
            return fn(*args, **kwargs)
        finally:
            LOG["phases"].append({"phase": name, "start": t0, "end": _now()})

    return wrapper


for _name, _label in (("connect_all", "connect"), ("load_deploy_file", "prepare"),
                      ("run_ops", "execute"), ("disconnect_all", "disconnect")):
    setattr(_cli, _name, _phase(_label, getattr(_cli, _name)))

def _op_name(state: Any, op_hash: str) -> str:
    try:
        return ", ".join(sorted(state.get_op_meta(op_hash).names))
    except Exception:
        return op_hash


_orig_single_op = _operations._run_single_op
_orig_host_op = _operations.run_host_op


def _run_single_op(state: Any, op_hash: str) -> Any:
    """One operation on all hosts (pyinfra waits for every host before the next one)."""
    t0 = _now()
    try:
        return _orig_single_op(state, op_hash)
    finally:
        LOG["op_steps"].append({"op": _op_name(state, op_hash), "start": t0, "end": _now()})


def _run_host_op(state: Any, host: Any, op_hash: str) -> Any:
    t0 = _now()
    try:
        return _orig_host_op(state, host, op_hash)
    finally:
        LOG["host_ops"].append({"op": _op_name(state, op_hash), "host": host.name,
                                "start": t0, "end": _now()})


_operations._run_single_op = _run_single_op
_operations.run_host_op = _run_host_op

_orig_get_fact = _facts._get_fact


def _get_fact(state: Any, host: Any, cls: Any, *args: Any, **kwargs: Any) -> Any:
    g = gevent.getcurrent()
    t0 = _now()
    _in_fact[g] = True
    try:
        return _orig_get_fact(state, host, cls, *args, **kwargs)
    finally:
        _in_fact.pop(g, None)
        LOG["facts"].append({"fact": getattr(cls, "__name__", str(cls)), "host": host.name,
                             "start": t0, "end": _now()})


_facts._get_fact = _get_fact


def _command(kind: str, fn: Any) -> Any:
    def wrapper(self: Host, *args: Any, **kwargs: Any) -> Any:
        fact = _in_fact.get(gevent.getcurrent(), False)
        what = args[0] if args else kwargs.get("command", "")
        if kind != "exec":  # put/get: (local, remote) -> the remote file name
            what = args[1] if len(args) > 1 else kwargs.get("remote_filename", "")
        masked = getattr(what, "get_masked_value", None)  # hides HiddenValue parts
        text = str(masked() if masked else what)
        t0 = _now()
        try:
            return fn(self, *args, **kwargs)
        finally:
            LOG["commands"].append({"kind": kind, "host": self.name, "fact": fact,
                                    "start": t0, "end": _now(), "cmd": text[:300]})

    return wrapper


Host.run_shell_command = _command("exec", Host.run_shell_command)  # type: ignore[method-assign]
Host.put_file = _command("put", Host.put_file)  # type: ignore[method-assign]
Host.get_file = _command("get", Host.get_file)  # type: ignore[method-assign]


@atexit.register
def _write() -> None:
    LOG["imported"] = T_IMPORTED - T_START
    LOG["end"] = _now()
    path = os.environ.get("BENCH_PROBE_LOG")
    if path:
        with open(path, "w") as f:
            json.dump(LOG, f)


if __name__ == "__main__":
    sys.argv[0] = "pyinfra"
    sys.exit(main())
