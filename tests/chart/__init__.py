"""Helm chart tests: lint, render matrix, schema validation, RBAC and CRD agreement, images."""
