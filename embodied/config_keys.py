"""One check for every settings dataclass built from a mapping (a Hydra group, a JSON file, a dict)."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable, Mapping, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, what: str, ignore: Iterable[str] = ()) -> T:
    """`cls(**values)`, refusing keys that are not its fields by name; `ignore`: keys dropped without a word
    (e.g. a Hydra `_target_`). `what` names the settings in the error ("safety setting", "policy config key")."""
    values = {k: v for k, v in dict(values or {}).items() if k not in set(ignore)}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; valid: {', '.join(sorted(known))}")
    return cls(**values)
