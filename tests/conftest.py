"""Shared fixtures: a real stack (Redis, Orthanc with the plugin, a Celery worker) on free loopback ports, and a
browser on its Orthanc Explorer. Shared helpers are in :mod:`tests.support`."""

from __future__ import annotations

import os
import shutil

import pytest

from lookalike.ops.stack import Stack, StackConfig
from tests.support import CHROMIUM_FLAGS, require_programs


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    """The whole stack, started once for the session's end-to-end tests, stopped after them."""
    require_programs("Orthanc", "redis-server", "storescu", "findscu", "dsrdump")
    weights = {n: os.environ[f"LOOKALIKE_TEST_WEIGHTS_{n.upper()}"] for n in ("us", "xr") if f"LOOKALIKE_TEST_WEIGHTS_{n.upper()}" in os.environ}
    config = StackConfig.create(tmp_path_factory.mktemp("stack"), weights=weights)
    with Stack(config) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, driven by playwright through ``executable_path`` (no browser download)."""
    require_programs("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, stack: Stack):
    """A page logged in to the stack's Orthanc as admin; fails the test on any JavaScript error."""
    context = browser.new_context(http_credentials={"username": "admin", "password": stack.config.admin_password},
                                  viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"
