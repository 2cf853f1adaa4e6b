"""The kubetune test suite; a package so that tests can import the helpers in ``tests.support``."""
