"""Options declared once: a dataclass field carries its default, its help text and its allowed values.

    @dataclass
    class TrainConfig:
        loss: str = opt("bce", "training loss", choices=("bce", "focal"))

`add_options` / `parser_for` generate the argparse options (one `--name-with-dashes` per field; bool fields get
`--x/--no-x`, dict/list fields take JSON, `str | None` fields default to None), `check_choices` validates every
field that declares choices, `require` is the one way a config check fails (a ConfigError whose message is the
line the user sees), and `help_of` gives the docs generators the same text. A field without `opt` metadata still
becomes an option; `documented` lists the fields whose help is missing (tests keep it empty).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import MISSING

from hpa.errors import ConfigError


def opt(default=MISSING, help: str = "", *, choices=None, default_factory=MISSING, **extra) -> dataclasses.Field:
    """A dataclass field with its help text and allowed values (`choices`) as metadata; `extra` metadata is kept
    for other generators (e.g. how a pipeline run parameter reaches the training tasks)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, **extra}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(name)


def help_of(cls, name: str) -> str:
    """The help text declared for field `name` of dataclass `cls` ("" when none)."""
    return _field(cls, name).metadata.get("help", "")


def default_of(cls, name: str):
    f = _field(cls, name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


def undocumented(cls) -> list[str]:
    """Fields of `cls` that declare no help text."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]


def require(ok: bool, message: str) -> None:
    """The one validation helper: raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def spoken(values) -> str:
    """('a', 'b', 'c') -> 'a, b or c'."""
    values = [str(v) for v in values]
    return "" if not values else values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def check_choices(obj, prefix: str = "") -> None:
    """ConfigError `<prefix><field>: <value!r>, expected a, b or c` for the first field outside its choices."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices is not None:
            value = getattr(obj, f.name)
            require(value in choices, f"{prefix}{f.name}: {value!r}, expected {spoken(choices)}")


def json_type(kind: type):
    """argparse type for a JSON object/list option."""
    def parse(text: str):
        try:
            value = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}, got {text!r}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}, got {text!r}")
        return value
    return parse


def _base_type(hint) -> type:
    """The option's value type of a field's type hint (`X | None` -> X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    return origin if isinstance(origin, type) else str


def add_options(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (), required: tuple[str, ...] = (),
                overrides: dict[str, dict] | None = None) -> None:
    """One option per field of dataclass `cls` (except `skip`), help and choices from the field's metadata, the
    field's default as the option's default (`required` ones have none). `overrides` maps a field to extra
    add_argument keywords (e.g. a default computed at run time)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _base_type(hints[f.name])
        text = f.metadata.get("help", "")
        kwargs: dict = {"help": text}
        if f.name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default_of(cls, f.name)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (dict, list):
            kwargs["type"] = json_type(kind)
            kwargs["help"] = f"{text} (JSON)".strip()
        else:
            kwargs["type"] = kind
            if f.metadata.get("choices") is not None:
                kwargs["choices"] = f.metadata["choices"]
        if f.name not in required and kwargs["default"] not in (None, ""):
            default = kwargs["default"]
            shown = json.dumps(default) if kind in (dict, list) else ("on" if default else "off") if kind is bool \
                else default
            kwargs["help"] = f"{kwargs['help']} (default: {shown})".strip()
        kwargs.update((overrides or {}).get(f.name, {}))
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def parser_for(cls, prog: str, description: str, **options) -> argparse.ArgumentParser:
    """An ArgumentParser whose options are `cls`'s fields (see add_options)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, cls, **options)
    return parser


def from_args(cls, args: argparse.Namespace, **fixed):
    """An instance of `cls` from the parsed options that are its fields (others ignored), plus `fixed`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **fixed)
