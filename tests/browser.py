"""Headless Chromium for the browser tests: Debian's `chromium` (installed by `.ci/run` with
apt-get) driven through Playwright's Python API; no browser is downloaded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, Playwright, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


_shared: list[tuple[Playwright, Browser]] = []


@contextmanager
def chromium() -> Iterator[Browser]:
    """The module's one browser (started by its first user, closed by `close_shared` once the
    tests go on to another module: see conftest.py): each test gets it for the block, and the
    contexts and pages it opened are closed after it, so no test sees another's cookies, storage
    or pages."""
    if not _shared or not _shared[0][1].is_connected():
        close_shared()
        playwright = sync_playwright().start()
        _shared.append((playwright, playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)))
    browser = _shared[0][1]
    before = set(browser.contexts)
    try:
        yield browser
    finally:
        for context in browser.contexts:
            if context not in before:
                context.close()


def close_shared() -> None:
    while _shared:
        playwright, browser = _shared.pop()
        try:
            browser.close()
        finally:
            playwright.stop()
