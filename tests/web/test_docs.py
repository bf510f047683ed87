"""/docs and /redoc render in real headless Chromium from the app's own files: every request
they make goes to the app, and any other host (ReDoc's CDN logo) is refused by the CSP."""

from __future__ import annotations

import json

import pytest

from tests.web.test_page import pytestmark, start_chromium  # noqa: F401 - and its skip

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def logging_browser():
    """Chromium that records its network events (the DevTools performance log)."""
    driver = start_chromium(**{"goog:loggingPrefs": {"performance": "ALL"}})
    yield driver
    driver.quit()


def outside_requests(browser, origin: str) -> dict[str, str]:
    """URL -> why it failed ('' if it did not), for each request to anywhere but `origin`."""
    sent, failed = {}, {}
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed":
            failed[params["requestId"]] = params.get("blockedReason") or params["errorText"]
    return {
        url: failed.get(rid, "")
        for rid, url in sent.items()
        if not url.startswith((origin, "data:", "blob:"))
    }


def test_swagger_ui_renders_the_api_offline(logging_browser, live):
    browser = logging_browser
    browser.get_log("performance")  # drop earlier events
    browser.get(live.url + "/docs")
    WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path[data-path='/predict']")
    )
    assert "piggyback-serve" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info").text
    assert outside_requests(browser, live.url) == {}


def test_redoc_renders_the_api_offline(logging_browser, live):
    browser = logging_browser
    browser.get_log("performance")
    browser.get(live.url + "/redoc")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".api-content h1"))
    assert "piggyback-serve" in browser.find_element(By.CSS_SELECTOR, ".api-content h1").text
    WebDriverWait(browser, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "[data-section-id]")
    )
    assert all(why == "csp" for why in outside_requests(browser, live.url).values())
