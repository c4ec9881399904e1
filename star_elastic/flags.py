"""Command-line flags generated from config dataclasses, so that each option has one spelling.

Every field of a command's config becomes `--field-name` (type from the annotation, help from the
docstring written under the field, `(default: ...)` appended); a nested block's fields become flags
of their own names when the command flattens that block (`elastic.budgets` → `--budgets`), and are
YAML-only otherwise. Positional fields are named per command. Flags not given stay out of the
result, so `--config FILE.yaml` supplies them and given flags override it key by key.

    bool                  --x / --no-x
    int, float, str       --x VALUE
    Literal[...]          --x {a,b,c}
    tuple[int | float | str, ...]   --x 1,2,3 (comma-separated)
    float | str           --x 0.5 | --x NAME (a number where it parses as one)
    bool | str            --x (true) | --x VALUE
    dict                  --x JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

from star_elastic.config import ConfigError, block_type, field_docs

PREFIX = "cfg:"  # argparse dest prefix of generated flags: "cfg:elastic.budgets"


def add_config_flags(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = (),
                     flatten: tuple[str, ...] = ()) -> None:
    """Add a flag (or positional argument) for every supported field of dataclass `cls`; blocks named
    in `flatten` contribute their fields too. Two fields with the same flag are a programming error."""
    for path, f, hint, default in _leaves(cls, flatten):
        name = path.rsplit(".", 1)[-1]
        help_text = _help(field_docs(f.owner).get(f.name, ""), default)
        if name in positional:  # optional on the command line: YAML may give it; the config checks it
            parser.add_argument(PREFIX + path, metavar=name.upper(), help=help_text, default=argparse.SUPPRESS,
                                **_positional_spec(hint))
            continue
        spec = _spec(hint)
        if spec is not None:  # else YAML only (e.g. a list of token ids)
            if "choices" not in spec and "action" not in spec:
                spec.setdefault("metavar", name.upper())
            parser.add_argument("--" + name.replace("_", "-"), dest=PREFIX + path, help=help_text,
                                default=argparse.SUPPRESS, **spec)


def _positional_spec(hint: Any) -> dict:
    """A positional argument: one value, or several for a tuple field."""
    if typing.get_origin(hint) is tuple:
        return {"nargs": "*", "type": typing.get_args(hint)[0]}
    return {"nargs": "?", **(_spec(hint) or {})}


@dataclasses.dataclass
class _Field:
    """A dataclass field and the class that declares it (for its docstring)."""

    name: str
    owner: type


def _leaves(cls: type, flatten: tuple[str, ...], prefix: str = ""):
    """(dotted path, field, annotation, default) of every non-block field, blocks in `flatten` expanded."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        block = block_type(hints[f.name])
        default = _default(f)
        if block is not None:
            if f.name in flatten:
                yield from _leaves(block, flatten, prefix + f.name + ".")
            continue
        owner = next(k for k in cls.__mro__ if f.name in getattr(k, "__annotations__", {}))
        yield prefix + f.name, _Field(f.name, owner), hints[f.name], default


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _help(doc: str, default: Any) -> str:
    text = " ".join(doc.split()).replace("%", "%%")
    if default not in (None, "", (), False) and not dataclasses.is_dataclass(default):
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text += f" (default: {shown})"
    return text


def _spec(hint: Any) -> dict | None:
    """argparse keyword arguments for a field annotation; None for one the command line cannot give."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _spec(inner[0])
        if set(inner) == {float, str}:
            return {"type": _number_or_text, "metavar": "BUDGET|NAME"}
        if bool in inner and str in inner:
            return {"nargs": "?", "const": True, "metavar": "VALUE"}
        return None
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": hint}
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    elems = {a for a in args if a is not Ellipsis}
    if origin is tuple and len(elems) == 1 and args[0] in (int, float, str):  # tuple[X, ...] or tuple[X, X]
        return {"type": _comma_list(args[0]), "metavar": "A,B,..."}
    if hint is dict or origin is dict:
        return {"type": _json_mapping, "metavar": "JSON"}
    return None


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _comma_list(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The generated flags the user gave, by dotted config key (`elastic.budgets`)."""
    return {key[len(PREFIX):]: value for key, value in vars(args).items() if key.startswith(PREFIX)}


def config_source(args: argparse.Namespace, command: str) -> str:
    return getattr(args, "config", None) or f"{command} flags"
