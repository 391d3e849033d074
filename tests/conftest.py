"""Shared, generic fixtures. Keep this file small: fixtures for one area belong in its test module."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """One temporary Prefect server and database for the whole session (it takes 15-20 s to start);
    yields its API URL. Only tests that run flows ask for it."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # processes started by tests (Dask workers) need it before they start
        try:
            yield url
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved
