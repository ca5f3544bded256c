"""A tiny name -> object registry, shared by policies, predictors, trace formats and families.

Registries replace if/else chains of names: the CLI, the simulator and the runtime all look names
up here, and an unknown name produces an error that lists the valid ones.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("lru", "least recently used")``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            doc = help or (getattr(obj, "__doc__", None) or "").strip().splitlines()[:1]
            self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise ConfigError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def describe(self, name: str) -> str:
        self.get(name)
        return self._help[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def split_spec(text: str, what: str = "parameter") -> tuple[str, dict[str, str]]:
    """``"name"`` or ``"name:key=value:key=value"`` (a registered name with parameters, as the CLI and
    suite configs write them) -> ``(name, {key: raw value})``; ``what`` starts the error message."""
    name, *rest = text.split(":")
    params: dict[str, str] = {}
    for item in rest:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r} in {text!r} is not key=value (e.g. lfu:half_life=32)")
        k, v = item.split("=", 1)
        params[k.strip()] = v.strip()
    return name.strip(), params


def split_spec_values(text: str, what: str = "parameter") -> tuple[str, dict[str, Any]]:
    """``split_spec`` with each value as a constructor takes it: an integer, else a number, else the text
    (``"learned:window=12:calibrate=isotonic"`` -> ``("learned", {"window": 12, "calibrate": "isotonic"})``);
    an empty key or value is an error too."""
    name, raw = split_spec(text, what)
    params: dict[str, Any] = {}
    for k, v in raw.items():
        if not k or not v:
            raise ConfigError(f"{what} {k + '=' + v!r} in {text!r} is not key=value (e.g. learned:window=12)")
        for conv in (int, float):
            try:
                params[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            params[k] = v
    return name, params
