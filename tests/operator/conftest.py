"""Fixtures for running the real operator: ``operator_process``, ``ftj_cluster``, ``emulated_cluster``, ``job_controller``."""

from tests.operator.operating import emulated_cluster, ftj_cluster, job_controller, operator_process  # noqa: F401
