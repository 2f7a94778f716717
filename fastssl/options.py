"""Settings declared once, as dataclass fields with their help: the run's (fastssl.config.TrainConfig) and each
method's own (methods.<name>.Options, with a value for small images and one for ImageNet, and a source). The
command line, config files and checkpoints are generated from these declarations."""

from __future__ import annotations

from dataclasses import Field, field, fields

from .errors import UserError

TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def option(default, help: str, *, check: str = "none", fixed: bool = False, per_command: bool = False):
    """A run setting: its default, --help text and valid range (see `recipe`). fixed: a resumed run keeps it (it
    defines what the run trains); per_command: a setting of one command, which a resumed run takes from its own
    command line."""
    return field(default=default, metadata={"help": help, "check": check, "fixed": fixed, "per_command": per_command})


def recipe(small, imagenet, help: str, source: str, *, check: str = "positive"):
    """A method option: its recipe value for small images (at most 64 px) and for ImageNet, what it is, where the
    values come from (paper section or official code), and its valid range: positive | fraction (0 to 1) |
    non-negative | none."""
    return field(default=imagenet, metadata={"small": small, "help": help, "source": source, "check": check})


def type_name(f: Field) -> str:
    """'int', 'float', 'str' or 'bool' for a field annotated as one (optionally `| None`)."""
    return str(f.type).split(" ")[0]


def optional(f: Field) -> bool:
    return "None" in str(f.type)


def check_type(f: Field, value) -> None:
    """A one-line error for a setting of the wrong type (a config file's `epochs: many`)."""
    kind = TYPES.get(type_name(f))
    if kind is None or (value is None and optional(f)):
        return
    expected = (int, float) if kind is float else kind
    if not isinstance(value, expected) or (kind is int and isinstance(value, bool)):
        raise UserError(f"setting {f.name}={value!r} must be {type_name(f)}")


def check_types(obj) -> None:
    for f in fields(obj):
        check_type(f, getattr(obj, f.name))


RANGES = {"positive": (lambda v: v > 0, "must be positive"), "fraction": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
          "non-negative": (lambda v: v >= 0, "must be 0 or more")}


def check_ranges(obj) -> None:
    """A one-line error for a value out of its field's declared range (metadata `check`)."""
    for f in fields(obj):
        value, rule = getattr(obj, f.name), RANGES.get(f.metadata.get("check", "none"))
        if rule and value is not None and not isinstance(value, bool) and not rule[0](value):
            raise UserError(f"{f.name}={value} {rule[1]}")
