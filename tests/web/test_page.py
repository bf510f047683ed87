"""The page at `/`, end to end in real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium): choose a task and an image, read the labels the page shows, and compare
them with the API's answer for the same image."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

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


def test_page_shows_the_servers_error_message(browser, live, tmp_path):
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
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.get_attribute("role") == "alert"
    assert r.json()["error"]["message"] in error.text
    assert not browser.find_element(By.ID, "output").is_displayed()
    browser.save_screenshot(str(tmp_path / "error.png"))


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
