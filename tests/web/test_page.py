"""The page at `/`, end to end in real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium): choose a task and an image, read the labels the page shows, and compare
them with the API's answer for the same image."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks.backbones import load_backbone
from tests.client.live_server import LABELS
from tests.server.server_support import BACKBONE, make_artifact

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=900,900",
)
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (bash .ci/run installs them)",
)


def bundled_image() -> Path:
    """A real photo that ships inside an installed package (scikit-image's cat)."""
    import skimage.data

    return Path(skimage.data.__file__).parent / "chelsea.png"


def start_chromium(**capabilities):
    """Headless Debian Chromium through chromedriver, with these extra capabilities."""
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    for name, value in capabilities.items():
        options.set_capability(name, value)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


def open_page(browser, url: str) -> None:
    browser.get(url + "/")
    wait_state(browser, "ready")


def wait_state(browser, *states: str) -> str:
    """The page marks <body data-state> loading / ready / busy / done / error."""
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in states
    )
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def task_picker(browser) -> Select:
    return Select(browser.find_element(By.ID, "task"))


def shown_labels(browser) -> list[str]:
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#top .label")]


def api_labels(url: str, task: str, image: bytes) -> list[str]:
    r = httpx.post(f"{url}/predict", params={"task": task, "top_k": 5}, files={"file": image})
    assert r.status_code == 200, r.text
    return [t["label"] for t in r.json()["results"][0]["top"]]


def test_page_shows_the_apis_top5_for_a_chosen_image(browser, live, tmp_path):
    open_page(browser, live.url)
    options = [o.get_attribute("value") for o in task_picker(browser).options]
    assert options == sorted(options) and {"alpha", "beta"} <= set(options)
    task_picker(browser).select_by_value("beta")
    image = bundled_image()
    browser.find_element(By.ID, "file").send_keys(str(image))  # classifies on choice
    assert wait_state(browser, "done", "error") == "done"

    assert shown_labels(browser) == api_labels(live.url, "beta", image.read_bytes())
    scores = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#top .score")]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5
    bars = browser.find_elements(By.CSS_SELECTOR, "#top .bar span")
    widths = [b.size["width"] for b in bars]
    assert len(widths) == 5 and widths == sorted(widths, reverse=True) and widths[0] > 0
    assert "ms" in browser.find_element(By.ID, "latency").text
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.save_screenshot(str(tmp_path / "page.png"))


NOT_AN_IMAGE = "This file is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF). Pick an image file."


def shown_error(browser) -> tuple[str, str]:
    """The sentence the error box shows, and the server's own words under "Details"."""
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.get_attribute("role") == "alert"
    detail = browser.find_element(By.ID, "error-detail").get_attribute("textContent")
    return browser.find_element(By.ID, "error-text").text, detail


def test_a_text_file_gets_a_plain_sentence_not_the_apis_words(browser, live, tmp_path):
    open_page(browser, live.url)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(notes))
    assert wait_state(browser, "done", "error") == "error"
    r = httpx.post(
        f"{live.url}/predict?task=alpha",
        content=notes.read_bytes(),
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 415
    plain, detail = shown_error(browser)
    assert plain == NOT_AN_IMAGE
    # The API's words are kept for developers, folded away under "Details".
    visible = browser.find_element(By.ID, "error").text
    assert "unsupported_media_type" not in visible and "multipart" not in visible
    assert r.json()["error"]["message"] in detail and "HTTP 415" in detail
    assert not browser.find_element(By.ID, "output").is_displayed()
    browser.save_screenshot(str(tmp_path / "error.png"))


ANSWERS = {  # what the server (or the network) answers -> the sentence the page shows
    "413": (413, "payload_too_large", "This image is too large. Pick a smaller one"),
    "404": (404, "task_not_found", "This task is not served any more. Reload the page"),
    "503": (503, "overloaded", "The server is busy right now. Try again in a moment."),
    "503 registry": (503, "registry_unavailable", "The server cannot reach its tasks"),
    "504": (504, "timeout", "The server took too long to answer."),
    "network": (None, None, "Could not reach the server."),
}


def test_each_error_the_page_can_meet_reads_as_a_plain_sentence(browser, live):
    open_page(browser, live.url)
    browser.find_element(By.ID, "file").send_keys(str(bundled_image()))
    assert wait_state(browser, "done", "error") == "done"
    for name, (status, code, sentence) in ANSWERS.items():
        # The page's own fetch answers as the server would (or fails, as a dropped network).
        fake = (
            "window.fetch = () => Promise.reject(new TypeError('Failed to fetch'));"
            if status is None
            else f"""window.fetch = async () => new Response(
                JSON.stringify({{error: {{code: "{code}", message: "the API's words"}}}}),
                {{status: {status}, headers: {{"content-type": "application/json"}}}});"""
        )
        browser.execute_script(fake + "document.body.dataset.state = 'ready'; classify();")
        assert wait_state(browser, "error") == "error", name
        plain, detail = shown_error(browser)
        assert plain.startswith(sentence), (name, plain)
        assert "the API's words" not in browser.find_element(By.ID, "error").text, name
        assert ("the API's words" in detail) == (status is not None), (name, detail)
        assert not browser.find_element(By.ID, "output").is_displayed(), name


def test_the_page_says_what_each_task_expects(browser, live):
    said = "A photo of one flower, close up"
    backbone = load_backbone(BACKBONE, "random")
    path = live.registry / "flowers.safetensors"
    artifacts.write(make_artifact(backbone, "flowers", n_labels=30, description=said), path)
    try:
        eventually(lambda: httpx.get(f"{live.url}/tasks/flowers").status_code == 200)
        browser.get(f"{live.url}/?task=flowers")
        wait_state(browser, "ready")

        def shown(element_id: str) -> str:
            element = browser.find_element(By.ID, element_id)
            return element.text if element.is_displayed() else ""

        assert shown("task-description") == said
        assert "32 × 32 pixel square" in shown("task-info")
        labels = [f"flowers-{i}" for i in range(30)]
        assert shown("task-count") == "Its 30 labels"
        assert shown("task-labels") == ", ".join(labels[:20]) + ", and 10 more"
        assert browser.find_element(By.ID, "task-labels").get_attribute("title") == (
            ", ".join(labels)
        )
        note = shown("task-note")
        assert "always picks one of these labels" in note and "none of these" in note

        task_picker(browser).select_by_value("alpha")  # an artifact without a description
        assert shown("task-description") == ""
        assert shown("task-labels") == ", ".join(f"alpha-{i}" for i in range(LABELS["alpha"]))
        assert shown("task-note")
    finally:
        path.unlink()
        eventually(lambda: httpx.get(f"{live.url}/tasks/flowers").status_code == 404)


def eventually(predicate, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_page_is_usable_with_the_keyboard(browser, live):
    open_page(browser, live.url)
    keys = ActionChains(browser)

    def focused() -> str:
        return browser.switch_to.active_element.get_attribute("id")

    # Tab from the top of the page reaches the task picker first; arrows change the task.
    keys.send_keys(Keys.TAB).perform()
    assert focused() == "task"
    before = task_picker(browser).first_selected_option.get_attribute("value")
    keys.send_keys(Keys.ARROW_DOWN).perform()
    task = task_picker(browser).first_selected_option.get_attribute("value")
    assert task != before

    # Then the file chooser (its dialog cannot open headless, so the file is set directly).
    keys.send_keys(Keys.TAB).perform()
    assert focused() == "file"
    image = bundled_image()
    browser.find_element(By.ID, "file").send_keys(str(image))
    assert wait_state(browser, "done", "error") == "done"
    assert shown_labels(browser) == api_labels(live.url, task, image.read_bytes())

    # Then the button; Enter on it classifies again.
    keys.send_keys(Keys.TAB).perform()
    assert focused() == "go"
    browser.execute_script(
        "document.body.dataset.state = 'ready'; document.getElementById('top').replaceChildren()"
    )
    keys.send_keys(Keys.ENTER).perform()
    assert wait_state(browser, "done", "error") == "done"
    assert shown_labels(browser) == api_labels(live.url, task, image.read_bytes())
