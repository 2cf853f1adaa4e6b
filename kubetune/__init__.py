"""kubetune: fine-tune language models on Kubernetes with a FineTuneJob.

The distribution has three layers that map onto this namespace: ``kubetune.api`` (the
FineTuneJob contract, torch-free), ``kubetune.operator`` (the kopf operator) and
``kubetune.trainer`` (what runs in the pods and under ``kubetune train``). ``kubetune.cli`` is
the console script that fronts all three.
"""

__version__ = "0.1.0"
