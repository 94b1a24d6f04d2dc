"""The pieces every params schema module shares: strict models, merging and clear errors.

Every model forbids unknown keys, so a typo in params.yaml stops the stage with one message that
names the key and lists what is allowed. Nothing here imports torch or the library: the library
imports the config classes (one class per concept), never the other way round.
"""

from __future__ import annotations

import copy
import hashlib
import json
from abc import abstractmethod
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A params problem, with a message meant for the person who edited params.yaml."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudyConfig(Strict):
    """What every study's config offers the pipeline: its rows and each row's resolved config."""

    rows: list[str]

    @abstractmethod
    def row_train(self, row: str) -> Any:
        """The row's ``TrainConfig`` (study defaults merged with the row's overrides)."""

    @abstractmethod
    def row_model(self, row: str) -> Strict:
        """The row's model config (study defaults merged with the row's overrides)."""

    @abstractmethod
    def row_rule(self, row: str) -> Strict:
        """The row's learning-rule config (its ``kind`` and hyper-parameters)."""

    def task_config(self) -> Strict | None:
        """The study's task/data config, if it has one (part of every run's identity)."""
        return getattr(self, "task", None)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_checked(base: BaseModel, override: dict[str, Any], where: str) -> Any:
    """Validate a per-row override against the model it overrides (same schema, same errors)."""
    if not override:
        return base
    try:
        return type(base).model_validate(deep_merge(base.model_dump(), override))
    except ValidationError as err:
        raise ValueError(format_validation_error(err, where, type(base))) from None


def check_rows(rows: list[str], rules: dict[str, Any]) -> None:
    unknown = [r for r in rows if r not in rules]
    if unknown:
        raise ValueError(f"rows {unknown} are not defined under rules (defined: {sorted(rules)})")
    if len(set(rows)) != len(rows):
        raise ValueError("rows must not repeat")


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- error messages
def format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """One line per problem, each naming the key as the user wrote it and what is allowed."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in _shown_loc(root, e["loc"]))
        if e["type"] == "extra_forbidden":
            parent = _model_at(root, e["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            lines.append(f"{source}: unknown key '{loc}'; allowed here: {', '.join(allowed)}")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{source}: {loc}: {e['msg']}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            where = f"{loc}: " if loc else ""
            lines.append(f"{source}: {where}{e['msg']}{shown}")
    return "\n".join(lines)


def _shown_loc(root: type[BaseModel], loc: tuple[Any, ...]) -> list[Any]:
    """``loc`` as the user wrote it: without validator markers and discriminator tags (pydantic
    puts the rule's ``kind`` into the path: rules.ep.ep.beta -> rules.ep.beta)."""
    ann: Any = root
    shown = []
    for part in loc:
        if str(part).startswith("function-after"):
            continue
        if ann is not None and _is_tag(ann, part):
            ann = _step_into(ann, part)
            continue
        shown.append(part)
        ann = _step_into(ann, part) if ann is not None else None
    return shown


def _is_tag(annotation: Any, part: Any) -> bool:
    options = _options(annotation)
    return len(options) > 1 and any(
        isinstance(o, type) and issubclass(o, BaseModel) and "kind" in o.model_fields
        and o.model_fields["kind"].default == part for o in options)


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the schema along ``loc`` to find the model whose keys are allowed there.

    ``loc`` mixes field names, dict keys (row names), list indices and discriminator tags (the
    ``kind`` of a rule); each step narrows the annotation accordingly.
    """
    ann: Any = root
    for part in loc:
        ann = _step_into(ann, part)
        if ann is None:
            return None
    found = [o for o in _options(ann) if isinstance(o, type) and issubclass(o, BaseModel)]
    return found[0] if len(found) == 1 else None


def _options(annotation: Any) -> list[Any]:
    """The alternatives of an annotation, with Annotated/Optional/Union unwrapped."""
    if get_origin(annotation) is Annotated:
        return _options(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [o for arg in get_args(annotation) for o in _options(arg) if o is not type(None)]
    return [annotation]


def _step_into(annotation: Any, part: Any) -> Any:
    options = _options(annotation)
    if _is_tag(annotation, part):
        return next(o for o in options if isinstance(o, type) and issubclass(o, BaseModel)
                    and o.model_fields.get("kind") and o.model_fields["kind"].default == part)
    for opt in options:
        if isinstance(opt, type) and issubclass(opt, BaseModel):
            if str(part) in opt.model_fields:
                return opt.model_fields[str(part)].annotation
        elif get_origin(opt) is dict:
            return get_args(opt)[1]
        elif get_origin(opt) is list and isinstance(part, int):
            return get_args(opt)[0]
    return None
