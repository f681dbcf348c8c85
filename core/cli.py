"""Command-line parsers generated from the config models: one source of defaults and help.

Every command reads ``t2i COMMAND [POSITIONAL ...] [CONFIG.yaml] [key=value ...] [--flags]``:
each leaf field of the command's config model is a ``--flag`` (dotted for sections, e.g.
``--train.max-steps 300``), and the same key works as ``train.max_steps=300`` or in the YAML.
Precedence: defaults < YAML < key=value < flags. This module imports no torch, so ``--help``
answers at once.
"""
from __future__ import annotations

import argparse
import typing
from pathlib import Path

from pydantic import BaseModel

from core.config import _model_in, load_config
from core.errors import UserError

_NONE_WORDS = ("none", "null")


def leaf_fields(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, FieldInfo) of every leaf field, sections flattened."""
    out = []
    for name, f in cls.model_fields.items():
        sub = _model_in(f.annotation)
        if sub is not None:
            out += leaf_fields(sub, f"{prefix}{name}.")
        else:
            out.append((prefix + name, f))
    return out


def _kind(annotation) -> str:
    """bool, list or value: how a flag of this type reads its argument."""
    if annotation is bool:
        return "bool"
    if annotation is list or typing.get_origin(annotation) is list:
        return "list"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) not in (None, typing.Literal) and len(args) == 1:  # X | None
        return _kind(args[0])
    return "value"


def _allows_none(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def field_default(f) -> object:
    return "required" if f.is_required() else f.get_default(call_default_factory=True)


def _help(f) -> str:
    doc = " ".join((f.description or "").split()).replace("%", "%%")
    default = field_default(f)
    if isinstance(default, BaseModel):
        default = default.model_dump()
    return f"{doc} (default: {default!r})" if default != "required" else f"{doc} (required)"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel], positional: tuple[str, ...] = (),
                         takes_file: bool = True) -> None:
    """Adds one ``--flag`` per leaf field of ``cls`` and the positional arguments."""
    names = " ".join(p.upper() for p in positional)
    meta = " ".join(x for x in (names, "[CONFIG.yaml]" if takes_file else "", "[key=value ...]") if x)
    parser.add_argument("args", nargs="*", metavar=meta or "ARGS",
                        help=("positional: " + ", ".join(positional) + "; " if positional else "")
                        + ("a YAML config file, " if takes_file else "") + "and dotted key=value overrides")
    group = parser.add_argument_group("config keys (each also works as key=value or in the YAML file)")
    for key, f in leaf_fields(cls):
        flag = "--" + key.replace("_", "-")
        dest = "cfg:" + key
        if _kind(f.annotation) == "bool":
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=_help(f))
        else:
            metavar = "A,B" if _kind(f.annotation) == "list" else key.rsplit(".", 1)[-1].upper()
            group.add_argument(flag, dest=dest, metavar=metavar, default=argparse.SUPPRESS, help=_help(f))
    parser.set_defaults(_config_cls=cls, _positional=positional, _takes_file=takes_file)


def _nest(key: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


def _flag_value(f, raw: object):
    if not isinstance(raw, str):
        return raw
    if raw.lower() in _NONE_WORDS and _allows_none(f.annotation):
        return None
    accepts_list = any(typing.get_origin(a) is list for a in typing.get_args(f.annotation))  # str | list[str]
    if accepts_list and _kind(f.annotation) != "list" and raw.strip().startswith("[") and raw.strip().endswith("]"):
        import yaml  # a YAML flow list, as key=value reads it: [a cat, 'a dog, sitting']

        try:
            items = yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
        return [str(x) for x in items] if isinstance(items, list) else raw
    if _kind(f.annotation) == "list":
        raw = raw.strip()
        if raw.startswith("["):
            raw = raw[1:-1] if raw.endswith("]") else raw[1:]
        return [x.strip() for x in raw.split(",") if x.strip()]
    return raw


def config_from_args(ns: argparse.Namespace):
    """Builds the command's config from the parsed command line (positionals, file, key=value, flags)."""
    from core.config import _merge

    cls, positional, takes_file = ns._config_cls, ns._positional, ns._takes_file
    fields = dict(leaf_fields(cls))
    path, overrides, values, free = None, [], {}, []
    for a in ns.args:
        if "=" in a and not a.startswith("=") and a.split("=", 1)[0].replace(".", "").replace("_", "").isalnum() \
                and len(free) >= len(positional):
            overrides.append(a)
        elif takes_file and path is None and a.endswith((".yaml", ".yml")) and len(free) >= len(positional):
            path = a
        else:
            free.append(a)
    if len(free) > len(positional):
        extra = free[len(positional)]
        hint = "a key=value override" if "=" not in extra else "an override of a known key"
        raise UserError(f"unexpected argument {extra!r}: expected {hint}"
                        + (f" after {', '.join(p.upper() for p in positional)}" if positional else ""))
    for name, value in zip(positional, free):
        values = _merge(values, _nest(name, value))
    for dest, raw in vars(ns).items():
        if dest.startswith("cfg:"):
            key = dest[4:]
            values = _merge(values, _nest(key, _flag_value(fields[key], raw)))
    missing = [p for p in positional[len(free):] if fields[p].is_required() and p not in values]
    if missing and not path:
        raise UserError(f"missing {', '.join(m.upper() for m in missing)} (see --help)")
    if path is not None and not Path(path).exists():
        raise UserError(f"config file {path} does not exist")
    return load_config(cls, path, overrides, values=values)
