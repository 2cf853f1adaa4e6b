"""Technique plugins of the trainer, one module each; importing this package registers them all.

Add a module here and import it below; ``base.register`` refuses duplicates and names that are
not techniques of the API.
"""

from kubetune.trainer.techniques.base import REGISTRY, Technique, TechniqueContext, enabled_techniques, register

__all__ = ["REGISTRY", "Technique", "TechniqueContext", "enabled_techniques", "register"]

# Plugin modules (each registers itself on import). Keep one import per line, sorted.
from kubetune.trainer.techniques import adversarial  # noqa: E402,F401
from kubetune.trainer.techniques import augmentation  # noqa: E402,F401
from kubetune.trainer.techniques import continual_learning  # noqa: E402,F401
from kubetune.trainer.techniques import controlled_generation  # noqa: E402,F401
from kubetune.trainer.techniques import curriculum  # noqa: E402,F401
from kubetune.trainer.techniques import distillation  # noqa: E402,F401
from kubetune.trainer.techniques import domain_adaptation  # noqa: E402,F401
from kubetune.trainer.techniques import early_stopping  # noqa: E402,F401
from kubetune.trainer.techniques import layer_selection  # noqa: E402,F401
from kubetune.trainer.techniques import multi_task  # noqa: E402,F401
from kubetune.trainer.techniques import prompt_engineering  # noqa: E402,F401
from kubetune.trainer.techniques import regularization  # noqa: E402,F401
from kubetune.trainer.techniques import task  # noqa: E402,F401
from kubetune.trainer.techniques import transfer_learning  # noqa: E402,F401
