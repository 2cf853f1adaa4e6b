"""Operator tests: builders, handlers against the emulator, metrics."""
