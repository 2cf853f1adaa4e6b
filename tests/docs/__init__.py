"""Documentation tests: generated references never drift, every technique, field and value is documented."""
