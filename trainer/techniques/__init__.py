"""Technique plugins of the trainer, one module each; importing this package registers them all.

Add a module here and import it below; ``base.register`` refuses duplicates and names that are
not techniques of the API.
"""

from kubetune.trainer.techniques.base import REGISTRY, Technique, TechniqueContext, enabled_techniques, register

__all__ = ["REGISTRY", "Technique", "TechniqueContext", "enabled_techniques", "register"]

# Plugin modules (each registers itself on import). Keep one import per line, sorted.
