"""Typed, documented configs: YAML files plus dotted ``key=value`` overrides (litgpt/torchtune style).

Each config is a pydantic model whose field docstrings are the documentation (they become
``--help``). Unknown keys are errors that list the valid keys. Overrides are parsed by OmegaConf's
dotlist reader, so ``train.learning_rate=1e-4`` and ``logging.validation_prompts=[a,b]`` work.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import UserError

C = TypeVar("C", bound=BaseModel)


class Strict(BaseModel):
    """Base for configs: unknown keys are rejected; field docstrings are the documentation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ReferenceData(Strict):
    """A dataset whose images FID is measured against (``t2i eval``, the export gate) and whose captions
    are the prompts unless a prompts file is given: a model of real images is measured on the user's data."""

    path: str
    """Dataset folder (images with captions in metadata.jsonl, metadata.csv or side-car .txt files, as
    ``t2i train`` reads them) or a hub dataset id (online)."""
    image_column: str = "image"
    """Column holding the image."""
    caption_column: str = "text"
    """Column holding the caption."""
    max_images: int = Field(10_000, ge=2)
    """At most this many of the dataset's images are decoded as FID references (a fixed random sample of
    its rows when it holds more; FID needs at least 2): they are held in memory at the model's size
    (10,000 at 512x512 are 7.9 GB). The prompts are still drawn from all of its captions."""

    SHORTHAND: typing.ClassVar[str] = "path"  # `references: data/mine` means {path: data/mine}, in a file or an override

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, v):
        return {cls.SHORTHAND: v} if isinstance(v, str) else v


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | tuple = (),
                base: dict | None = None, values: dict | None = None) -> C:
    """Builds ``cls`` from defaults < ``base`` < YAML file < dotted ``key=value`` overrides < ``values``
    (a nested dict of already-typed values, e.g. from command-line flags)."""
    data: dict = dict(base or {})
    if path is not None:
        data = _merge(_expand_shorthands(cls, data), _include_files(cls, _read_yaml(Path(path)), Path(path).parent))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"override {bad[0]!r} must look like key=value (e.g. train.max_steps=100)")
    if overrides:
        try:
            dotted = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
        except Exception as e:
            raise UserError(f"cannot parse overrides {list(overrides)}: {e}") from None
        data = _merge(_expand_shorthands(cls, data), dotted)
    if values:
        data = _merge(_expand_shorthands(cls, data), values)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(_explain(cls, e)) from None


def _include_files(cls: type[BaseModel], data: dict, here: Path) -> dict:
    """A section whose value is a string naming a .yaml file is read from that file (relative to the
    working directory, else to the including file); overrides of the section apply on top."""
    out = dict(data)
    for key, f in cls.model_fields.items():
        sub, val = _model_in(f.annotation), out.get(key)
        if sub is None:
            continue
        if isinstance(val, str) and val.endswith((".yaml", ".yml")):
            p = Path(val) if Path(val).is_file() else here / val
            out[key] = _include_files(sub, _read_yaml(p), p.parent)
    return out


def _expand_shorthands(cls: type[BaseModel], data):
    """A section given as a plain string where its model has a ``SHORTHAND`` field becomes
    ``{field: string}`` before something is merged over it, so the file's ``references: DIR`` and an
    override's ``references.caption_column=c`` combine (merged as they are, the override would replace
    the path). Only the side merged onto is expanded: a later plain string replaces the whole section
    (a new dataset does not inherit the former one's column names)."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for key, f in cls.model_fields.items():
        sub = _model_in(f.annotation)
        if sub is None or key not in out:
            continue
        short = getattr(sub, "SHORTHAND", None)
        if isinstance(out[key], str) and isinstance(short, str):
            out[key] = {short: out[key]}
        elif isinstance(out[key], dict):
            out[key] = _expand_shorthands(sub, out[key])
    return out


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} is not valid YAML text: {e}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {p} must hold a mapping of keys to values")
    return loaded


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _submodel(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for key in loc:
        if not isinstance(key, str) or key not in cls.model_fields:
            return cls
        sub = _model_in(cls.model_fields[key].annotation)
        if sub is None:
            return cls
        cls = sub
    return cls


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None


def _explain(cls: type[BaseModel], e: ValidationError) -> str:
    msgs = []
    for err in e.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(x) for x in loc)
        if err["type"] == "extra_forbidden":
            owner = _submodel(cls, loc[:-1])
            prefix = ".".join(str(x) for x in loc[:-1])
            valid = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in owner.model_fields)
            msgs.append(f"unknown config key '{dotted}'; valid keys here: {valid}")
        elif err["type"] == "value_error":  # a cross-field check of the model: its message says it all
            text = err["msg"].removeprefix("Value error, ")
            msgs.append(f"config key '{dotted}': {text}" if dotted else text)
        elif err["type"] == "missing":
            msgs.append(f"config key '{dotted}' is required")
        else:
            flag = "--" + dotted.replace("_", "-")
            msgs.append(f"config key '{dotted}' ({flag}): {err['msg']} (got {str(err.get('input'))[:80]!r})")
    return "; ".join(msgs)


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Writes the resolved config as YAML, atomically."""
    from core.io import atomic_write

    atomic_write(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per (dotted) key with its type, default and docstring, for ``--help``."""
    lines = []
    for name, f in cls.model_fields.items():
        key = prefix + name
        sub = _model_in(f.annotation)
        if sub is not None:
            lines.append(f"  {key}:  {f.description or ''}".rstrip())
            lines += describe(sub, key + ".")
            continue
        default: Any = "required" if f.is_required() else f.get_default(call_default_factory=True)
        tname = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
        lines.append(f"  {key} ({tname}, default {default!r}): {f.description or ''}".rstrip())
    return lines
