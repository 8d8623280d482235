"""The Hub stand-in of tests/hub_fixtures.py, for adapters read from the Hub."""

from tests.hub_fixtures import hub  # noqa: F401
