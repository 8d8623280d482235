"""The Hub stand-in and the tiny models of tests/hub_fixtures.py."""

from tests.hub_fixtures import hub, models  # noqa: F401
