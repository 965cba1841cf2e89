"""Option values that more than one command parses: one place for their wording."""

from __future__ import annotations

from typing import Optional

from vlm_export.errors import InputError


def comma_list(text: Optional[str]) -> Optional[list[str]]:
    """"FP16, int8" → ["fp16", "int8"]; None or "" → None (the option was not given)."""
    return [p.strip().lower() for p in text.split(",") if p.strip()] if text else None


def on_off(value: str, flag: str) -> bool:
    """"on"/"off" (any case) → True/False; anything else is bad input naming `flag`."""
    if value.lower() not in ("on", "off"):
        raise InputError(f"{flag} takes on or off (got '{value}')")
    return value.lower() == "on"
