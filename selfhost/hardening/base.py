"""The shape shared by every hardening control: on by default, off only with a reason."""

from __future__ import annotations

from pydantic import Field, model_validator

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
