"""Compile a model into plans: pure Python, deterministic, no target needed."""

from selfhost.compile.compiler import (
    CompileError,
    collect,
    compile_fleet,
    compile_server,
    prepare,
)
from selfhost.compile.plan import Plan
from selfhost.compile.target import Target

__all__ = ["CompileError", "Plan", "Target", "collect", "compile_fleet", "compile_server",
           "prepare"]
