"""The method registry: ``attribution.create("integrated_gradients", model)`` and ``attribution.list_methods()``.

The CLI, the benchmarks and the shared invariant tests enumerate methods from here instead of hard-coding them.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List, Optional, Type, TypeVar, Union

from torch import nn

from .explainer import Explainer

_REGISTRY: Dict[str, Type[Explainer]] = {}
E = TypeVar("E", bound=Type[Explainer])
MethodSpec = Union[str, Type[Explainer]]


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an explainer available under ``name``."""

    def decorate(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"two methods registered as {name!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_method(name: str) -> Type[Explainer]:
    """The explainer class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, sorted(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"no attribution method named {name!r}{hint}") from None


def create(name: str, model: nn.Module, **options: Any) -> Explainer:
    """Build the explainer registered as ``name`` for ``model``."""
    return get_method(name)(model, **options)


def list_methods(kind: Optional[str] = None) -> List[str]:
    """Registered method names, optionally only those of one ``kind`` ('gradient', 'cam', 'perturbation',
    'attention', 'region', 'magnitude', 'baseline')."""
    return sorted(n for n, cls in _REGISTRY.items() if kind is None or cls.kind == kind)


def resolve_method(spec: MethodSpec, family: type, what: str) -> Type[Explainer]:
    """The explainer class ``spec`` names (a registry name or the class itself), checked to be a ``family``."""
    cls = get_method(spec) if isinstance(spec, str) else spec
    if not (isinstance(cls, type) and issubclass(cls, family)):
        raise TypeError(f"{what} must be a {family.__name__} class or registry name, got {spec!r}")
    return cls
