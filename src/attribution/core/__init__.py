"""The contract every method shares: explainer base, targets, layers, batching, the state guard, the registry."""
from .explainer import Explainer
from .registry import create, get_method, list_methods, register
from .targets import Target, resolve_target

__all__ = ["Explainer", "Target", "create", "get_method", "list_methods", "register", "resolve_target"]
