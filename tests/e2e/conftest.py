"""Fixtures for end-to-end tests against a real Label Studio server (see tests/e2e/label_studio.py).

Every test in tests/e2e is marked ``e2e`` (deselect them with ``-m "not e2e"``).

``label_studio``: one server for the whole test session. When its venv (.e2e/ls-venv, or $HIH_E2E_VENV;
made by ``make e2e-deps``) is missing, tests that use it are skipped, unless ``HIH_E2E=require`` (CI),
which makes that an error. ``HIH_E2E_KEEP=1`` keeps the server's data directory and log afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .label_studio import DEFAULT_VENV, LABEL_CONFIG, LabelStudioServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def label_studio() -> Iterator[LabelStudioServer]:
    """A started Label Studio 1.23 server (admin user, legacy token, local ML backends allowed)."""
    if not LabelStudioServer.is_installed(DEFAULT_VENV):
        message = (
            f"Label Studio is not installed in {DEFAULT_VENV}: run `make e2e-deps` "
            "(scripts/install_label_studio.sh) to run the end-to-end tests"
        )
        if os.environ.get("HIH_E2E", "").lower() == "require":
            pytest.fail(message + " (HIH_E2E=require)", pytrace=False)
        pytest.skip(message)
    keep = os.environ.get("HIH_E2E_KEEP", "") not in ("", "0", "false")
    server = LabelStudioServer(DEFAULT_VENV, keep_data=keep)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if keep:
            print(f"\nLabel Studio data and log kept in {server.data_dir}")


@pytest.fixture(scope="session")
def label_config_xml() -> str:
    """The project's labelling interface (label_config.xml)."""
    return LABEL_CONFIG.read_text(encoding="utf-8")
