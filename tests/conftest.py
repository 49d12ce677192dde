from tests.support.fixtures import *  # noqa: F403

pytest_plugins: list[str] = []
