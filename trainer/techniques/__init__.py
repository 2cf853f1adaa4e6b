"""The trainer's side of the technique contract: the plugin interface, the shared context, and the
helpers plugins share (``inputs``: which fields are model input; ``layers``: the anatomy of a model).

The plugins themselves live in their technique's folder (``techniques/<name>/training.py``) and
are loaded from the technique registry (``kubetune.techniques``) by :func:`enabled_techniques`.
"""

from kubetune.trainer.techniques.base import Technique, TechniqueContext, enabled_techniques, plugin_class

__all__ = ["Technique", "TechniqueContext", "enabled_techniques", "plugin_class"]
