"""Settings shared by tests that sweep the methods: each method takes only the options it has."""

from __future__ import annotations

from fastssl.methods import METHODS


def own(method: str, **options) -> dict:
    """The options among `options` that `method` has (a short queue only for the methods with a queue)."""
    return {k: v for k, v in options.items() if k in METHODS[method].Options.names()}
