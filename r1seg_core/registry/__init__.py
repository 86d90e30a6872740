"""Known models: the list (`catalogue`), their download and conversion (`download`), the `r1seg models` command."""
from .catalogue import ModelEntry, entry_named, load_registry, resolve_model

__all__ = ["ModelEntry", "entry_named", "load_registry", "resolve_model"]
