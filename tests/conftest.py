"""Shared pytest configuration: fixture modules for the external servers the tests start."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.moto",
    "tests.fixtures.spanner",
]
