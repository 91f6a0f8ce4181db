"""The one rule for parts a file names by class (schedules, optimisers, losses): saved work loads back.

Every subclass of :class:`gpunn.schedules.Schedule`, :class:`gpunn.optim.Optimizer` and
:class:`gpunn.losses.Loss` joins its kind's :class:`Registry` when Python defines it
(``__init_subclass__``), under its own ``name`` if its class body sets one, else its qualified name
(``"mymodule.MySchedule"``: a subclass never passes for its parent). A model file or checkpoint stores
that key with the part's ``config()``; loading looks the key up, so a file naming a custom class loads
wherever the class is defined (import its module before :func:`gpunn.load`; a file never makes gpunn
import anything). Saving first proves the round trip: a configuration that is not JSON data, or that
does not rebuild an equal part, is refused before anything is written (:class:`~gpunn.errors.SaveError`
naming the part and the fix), and with ``fit(checkpoint=...)`` before the first epoch.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .errors import ConfigError, SaveError, unknown_name

__all__ = ["Registry", "json_data", "round_trip"]


class Registry:
    """Classes of one kind by key: the built-in ones plus every subclass defined since."""

    def __init__(self, kind: str):
        self.kind = kind
        self.classes: dict[str, type] = {}

    @staticmethod
    def key_of(cls: type) -> str:
        """The class's own ``name`` (set in its body), else ``module.QualName``."""
        own = cls.__dict__.get("name")
        return own if isinstance(own, str) and own else f"{cls.__module__}.{cls.__qualname__}"

    def add(self, cls: type) -> None:
        """Register ``cls``; ConfigError if another class (not a redefinition of it) has its key."""
        key = self.key_of(cls)
        old = self.classes.get(key)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"{self.kind} name {key!r} is taken by {old.__module__}.{old.__qualname__}; give "
                              f"{cls.__qualname__} another name (its files must load back as that class)")
        self.classes[key] = cls

    def names(self) -> list[str]:
        """The keys of gpunn's own classes (what ``names()`` of each module lists)."""
        return sorted(k for k, c in self.classes.items() if c.__module__.split(".")[0] == "gpunn")

    def all_names(self) -> list[str]:
        """Every key, custom classes included."""
        return sorted(self.classes)

    def get(self, key: Any) -> type | None:
        return self.classes.get(key) if isinstance(key, str) else None

    def find(self, name: Any, aliases: dict[str, str] | None = None) -> type:
        """The class of key ``name``, else of its lower-cased, stripped form or that form's alias; ConfigError
        (listing the names) if none."""
        cls = self.get(name)
        if cls is None:
            key = str(name).strip().lower()
            cls = self.get((aliases or {}).get(key, key))
        if cls is None:
            raise self.unknown(name)
        return cls

    def build(self, config: dict, lookup: Callable[[Any], type] | None = None) -> Any:
        """The part a configuration dict describes: ``config["name"]`` looked up (``lookup``, default: by
        key, ConfigError if unknown), called with the other entries (ConfigError if they do not fit)."""
        params = dict(config)
        name = params.pop("name", None)
        cls = lookup(name) if lookup is not None else self.get(name)
        if cls is None:
            raise self.unknown(name)
        try:
            return cls(**params)
        except TypeError as exc:
            raise ConfigError(f"bad parameters {params} for {self.kind} {name!r}: {exc}") from None

    def unknown(self, key: Any) -> ConfigError:
        """The error for a key no class has; a qualified name is a class of the user's not defined here."""
        err = unknown_name(self.kind, key, self.all_names())
        if isinstance(key, str) and "." in key:
            err = ConfigError(f"{err} It names a {self.kind} class of yours: import the module that defines it "
                              "before loading (gpunn never imports what a file names)")
        return err


def json_data(config: Any, what: str) -> Any:
    """``config`` as the JSON data a file stores (tuples become lists); SaveError if it is not JSON data."""
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise SaveError(f"cannot save {what}: its configuration {str(config)[:200]} is not JSON data ({exc}); "
                        "give it attributes of numbers, strings, lists and dicts (or a config() that "
                        "returns them and an __init__ that takes them back)") from None


def round_trip(config: Any, rebuild: Callable[[Any], Any], again: Callable[[Any], Any], what: str) -> Any:
    """The JSON form of ``config``, after proving that ``rebuild`` of it makes a part whose configuration
    (``again``) is the same: SaveError naming the fix otherwise."""
    data = json_data(config, what)
    try:
        back = json_data(again(rebuild(data)), what)
    except SaveError:
        raise
    except Exception as exc:        # any failure to rebuild means the file would not load
        raise SaveError(f"cannot save {what}: its configuration {str(data)[:200]} does not build it again "
                        f"({type(exc).__name__}: {str(exc)[:200]}); its __init__ must take the keys its "
                        "config() returns") from None
    if back != data:
        raise SaveError(f"cannot save {what}: its configuration {str(data)[:200]} builds one configured "
                        f"{str(back)[:200]}; its __init__ must take back exactly what config() returns")
    return data
