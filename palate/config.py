"""Typed, validated configs: YAML files plus ``--set a.b=value`` overrides.

Every stage has a pydantic model derived from :class:`Config`. Unknown keys are errors (a typo
in a config must never be silently ignored), every field carries a description (shown by
``palate config show STAGE`` and in the docs), and validation errors name the file and the
dotted field path.

Example::

    cfg = load_config(SFTConfig, "sft.yaml", ["train.lr=1e-4", "model=tiny"])
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from palate.errors import ConfigError

__all__ = [
    "ADDED_LATER",
    "Config",
    "added_later",
    "apply_overrides",
    "config_to_yaml",
    "describe_config",
    "load_config",
    "parse_config",
]

C = TypeVar("C", bound="Config")


# ``json_schema_extra`` of a field added after runs existed, whose default keeps the old
# behaviour: ``palate run`` leaves it out of a stage's fingerprint while it is at its default,
# so a run made before the field existed is not redone (see :func:`added_later`).
ADDED_LATER: dict[str, Any] = {"added_later": True}


def added_later(model: type[BaseModel], name: str) -> bool:
    """Is field ``name`` of ``model`` marked :data:`ADDED_LATER`?"""
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("added_later"))


class Config(BaseModel):
    """Base for all palate configs: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _parse_value(text: str) -> Any:
    """Parse an override value with YAML rules (``1e-4`` → float, ``true`` → bool, ``[1,2]``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML reads "1e-4" as a string (it wants "1.0e-4"); be friendlier.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key")
        node: dict[str, Any] = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {item!r}: {where} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this config)"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_config(cls: type[C], data: Mapping[str, Any], source: str = "<config>") -> C:
    """Validate a mapping into ``cls``; errors name ``source`` and the dotted field path."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: Iterable[str] = ()) -> C:
    """Load ``cls`` from a YAML file (optional) with ``--set`` style overrides applied."""
    data: dict[str, Any] = {}
    source = "<overrides>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of keys to values")
        data = loaded
    overrides = list(overrides)
    apply_overrides(data, overrides)
    if overrides:
        source += " (with --set overrides)"
    return parse_config(cls, data, source)


def config_to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _own_fields_first(cls: type[BaseModel]) -> list[str]:
    """Field names, those declared by ``cls`` first, then its bases' (nearest first)."""
    order: list[str] = []
    for klass in cls.__mro__:
        for name in inspect.get_annotations(klass):
            if name in cls.model_fields and name not in order:
                order.append(name)
    return order + [name for name in cls.model_fields if name not in order]


def describe_config(
    cls: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None
) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every leaf field, nested sections included.

    Defaults of a nested section come from its ``default_factory`` (which may differ from the
    section class's own defaults), so the listing shows what a config actually gets. A class's
    own fields come before those it inherits (a stage's inputs before the shared settings).
    """
    rows: list[tuple[str, str, str, str]] = []
    for name in _own_fields_first(cls):
        field = cls.model_fields[name]
        dotted = f"{prefix}{name}"
        ann = field.annotation
        if defaults is not None:
            value: Any = getattr(defaults, name)
            has_default = True
        elif field.is_required():
            value, has_default = None, False
        elif field.default_factory is not None:
            value, has_default = field.get_default(call_default_factory=True), True
        else:
            value, has_default = field.default, True
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((dotted, "section", "", field.description or ""))
            sub = value if isinstance(value, BaseModel) else None
            rows.extend(describe_config(ann, dotted + ".", sub))
            continue
        if typing.get_origin(ann) is typing.Literal:
            type_name = " | ".join(str(a) for a in typing.get_args(ann))
        else:
            type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        rows.append(
            (
                dotted,
                type_name,
                repr(value) if has_default else "(required)",
                field.description or "",
            )
        )
    return rows
