"""Shared pytest configuration: fixture modules for the external servers the tests start."""

import pytest

# The contract suites are plain modules imported by test modules: rewrite their asserts
# too, so a failure shows the values, not a bare AssertionError.
pytest.register_assert_rewrite("tests.database.store_contract", "tests.providers.provider_contract")

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.moto",
    "tests.fixtures.spanner",
]
