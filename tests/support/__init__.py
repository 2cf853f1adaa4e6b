"""
Test helpers shared by every test layer: the Kubernetes API server emulator (``emulating``), the
patch and selector semantics it applies (``patching``, ``selecting``) and the small cluster client
that the same test body uses against the emulator or a real cluster (``clusters``).
The fixtures in ``tests/conftest.py`` are the public face; import from here for types and helpers.
"""
