from tests.support.fixtures import *  # noqa: F403
from tests.support.reliability import report_requested, write_report


def pytest_sessionfinish() -> None:
    """Regenerate RELIABILITY.md from the recorded sections, only when asked to
    (``make reliability``): a plain test run must not modify tracked files."""
    if report_requested():
        write_report()
