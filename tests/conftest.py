from tests.support.fixtures import *  # noqa: F403
from tests.support.reliability import write_report


def pytest_sessionfinish() -> None:
    """Regenerate RELIABILITY.md from whatever reliability sections this run recorded."""
    write_report()
