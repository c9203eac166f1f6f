"""Pydantic validation whose errors point at file:line, with "did you mean" for misspelt keys."""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, Loc, Origin, Positions, Problem, did_you_mean, origin_of

M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], doc: dict, positions: Positions, default: Origin) -> M:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError([_problem(model, err, positions, default)
                           for err in _without_union_noise(exc.errors())]) from None


_MAPPING_ERRORS = {"model_type", "model_attributes_type", "dict_type"}
_SCALAR_ERRORS = {"float_type", "float_parsing", "int_type", "int_parsing", "string_type",
                  "bool_type", "bool_parsing"}


def _without_union_noise(errors: list[dict]) -> list[dict]:
    """A field typed `float | Model` fails in both branches; keep the branch the value meant:
    a mapping's errors come from the model, a scalar's from the scalar type."""
    locs = [_clean_loc(err["loc"]) for err in errors]
    kept = []
    for i, (err, loc) in enumerate(zip(errors, locs)):
        shadowed = any(j != i and other[: len(loc)] == loc for j, other in enumerate(locs))
        mapping = isinstance(err.get("input"), dict)
        if shadowed and ((err["type"] in _MAPPING_ERRORS and not mapping)
                         or (err["type"] in _SCALAR_ERRORS and mapping)):
            continue
        kept.append(err)
    return kept


def _problem(model: type[BaseModel], err: dict, positions: Positions, default: Origin) -> Problem:
    loc = _clean_loc(err["loc"])
    origin = origin_of(positions, loc, default)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = allowed_keys(model, loc[:-1])
        return Problem(origin, loc, "unknown key", hint=did_you_mean(str(loc[-1]), allowed)
                       or (f"allowed: {', '.join(sorted(allowed))}" if allowed else None))
    if kind == "missing":
        return Problem(origin, loc, "required field is missing")
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if kind == "literal_error":
        hint = did_you_mean(str(err.get("input")), _literal_choices(err))
        return Problem(origin, loc, message, err.get("input"), hint)
    return Problem(origin, loc, message, err.get("input"))


def _literal_choices(err: dict) -> list[str]:
    expected = (err.get("ctx") or {}).get("expected", "")
    return [part.strip(" '") for part in expected.replace(" or ", ",").split(",") if part.strip()]


_TYPE_TAGS = {"str", "float", "int", "bool", "list", "dict", "none"}


def _clean_loc(loc: tuple) -> Loc:
    """Drop pydantic's union-branch markers (`float`, `LearningRate`) from a location."""
    model_names = {cls.__name__ for cls in _all_models(BaseModel)}
    return tuple(
        part for part in loc
        if not (isinstance(part, str) and (
            part in _TYPE_TAGS or part in model_names
            or part.startswith(("function-", "tagged-union[", "constrained-"))))
    )


def _all_models(base: type) -> set[type]:
    found = set()
    for sub in base.__subclasses__():
        found.add(sub)
        found |= _all_models(sub)
    return found


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _child(annotation: Any, part: str | int) -> list[Any]:
    """Annotations reachable from `annotation` by one step of a location."""
    found = []
    for ann in ([annotation] if typing.get_origin(annotation) not in (typing.Union, types.UnionType)
                else typing.get_args(annotation)):
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(part, str):
            field = ann.model_fields.get(part)
            if field is not None:
                found.append(field.annotation)
        elif origin in (list, tuple) and isinstance(part, int):
            found.extend(typing.get_args(ann)[:1])
        elif origin is dict and isinstance(part, str):
            found.extend(typing.get_args(ann)[1:2])
    return found


def allowed_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the model found at `loc` inside `model` (empty when not a model)."""
    annotations: list[Any] = [model]
    for part in loc:
        annotations = [child for ann in annotations for child in _child(ann, part)]
    return sorted({name for ann in annotations for m in _models_in(ann) for name in m.model_fields})
