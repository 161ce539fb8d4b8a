"""The shape shared by every hardening control: on by default, off only with a reason."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from selfhost.compose.module import Module
from selfhost.models.base import StrictModel


class Control(StrictModel, Module):
    """A hardening control. Turning it off requires a ``reason``, which the plan shows.

    Every control is a :class:`~selfhost.compose.module.Module` that always runs: switched
    off, it still honours the requests it provides for (see each provider)."""

    enabled: bool = Field(default=True, description="Apply this control (strongly recommended).")
    reason: str | None = Field(
        default=None,
        min_length=3,
        description="Why this control is turned off. Required when `enabled` is false.",
    )

    @model_validator(mode="after")
    def _reason_when_off(self) -> Control:
        if not self.enabled and not self.reason:
            raise ValueError("turning a hardening control off requires a `reason`")
        return self

    def departures(self) -> list[tuple[str, str]]:
        """(setting, reason) for every setting inside this control that is off, by its path
        relative to the control (``sudo.requiretty``). The plan lists them with the controls
        that are off."""
        return _departures(self)


class Departure(Control):
    """A rule of a compliance benchmark that selfhost does NOT apply by default, for the
    reason given (shown by `selfhost plan`). Turn it on with ``{enabled: true}``."""

    enabled: bool = Field(default=False, description="Apply this rule (off by default: see "
                                                     "`reason`).")
    reason: str | None = Field(
        default=None,
        min_length=3,
        description="Why the rule is not applied (shown in the plan while it is off).",
    )


def departure(reason: str, description: str) -> Any:
    """A field holding a `Departure` that is off by default because of ``reason``."""
    return Field(default_factory=lambda: Departure(reason=reason), description=description)


def _departures(model: BaseModel) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Control):
            if not value.enabled:
                out.append((name, value.reason or ""))
            else:
                out += [(f"{name}.{path}", why) for path, why in value.departures()]
        elif isinstance(value, BaseModel):
            out += [(f"{name}.{path}", why) for path, why in _departures(value)]
    return out
