"""Method registry: `@register` a Method subclass in its own module and import the module here."""

from __future__ import annotations

from ..errors import UserError

METHODS: dict[str, type] = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


def get(name: str) -> type:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose {' | '.join(sorted(METHODS))}")
    return METHODS[name]


from . import byol, isd, mocov2, resa, ressl  # noqa: E402,F401  (registers)
