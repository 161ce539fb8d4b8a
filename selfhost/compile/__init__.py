"""Compile a model into a plan: pure Python, deterministic, no target needed."""

from selfhost.compile.compiler import collect, compile_server
from selfhost.compile.plan import Plan
from selfhost.compile.target import Target

__all__ = ["Plan", "Target", "collect", "compile_server"]
