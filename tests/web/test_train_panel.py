"""The page's "Learn a task" panel in real headless Chromium: a folder picked with the
webkitdirectory input is packed into a tar in the browser (its tar writer read back by
Python's tarfile), sent to POST /tasks/{name}/train, and the job followed over Server-Sent
Events until the new task is selected in the predict form; refusals show the server's words."""

from __future__ import annotations

import base64
import io
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.client.live_server import TOKEN
from tests.server.server_support import png
from tests.web.test_page import CHROMEDRIVER, CHROMIUM, bundled_image, start_chromium, wait_state

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (bash .ci/run installs them)",
)
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def image_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 20)) -> Path:
    """root/<class>/<i>.png: tiny random PNGs, `n` per class."""
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(png(100 * c + i, size))
    return root


def open_page(browser, url: str) -> None:
    browser.get(url + "/")
    wait_state(browser, "ready")


def panel_state(browser) -> str:
    return browser.find_element(By.ID, "learn").get_attribute("data-state")


def wait_panel(browser, *states: str, timeout_s: float = 30) -> str:
    """The panel marks <section id=learn data-state>: idle, sending, error (the POST was
    refused), queued, running, then the job's final state once the page has shown it."""
    WebDriverWait(browser, timeout_s, poll_frequency=0.2).until(lambda d: panel_state(d) in states)
    return panel_state(browser)


def text(browser, element_id: str) -> str:
    element = browser.find_element(By.ID, element_id)
    return element.get_attribute("textContent") if element.is_displayed() else ""


def tar_made_in_the_browser(browser, script: str) -> bytes:
    """Runs `script` (which ends by calling done(blob)) in the page; the blob's bytes."""
    b64 = browser.execute_async_script(
        """const finish = arguments[arguments.length - 1];
        const done = async (blob) => {
          const bytes = new Uint8Array(await blob.arrayBuffer());
          let s = ""; for (const b of bytes) s += String.fromCharCode(b);
          finish(btoa(s));
        };
        """
        + script
    )
    return base64.b64decode(b64)


def members(data: bytes) -> dict[str, bytes]:
    """name -> bytes of each member, read by Python's tarfile (which checks each header's
    checksum), after checking the writer's framing: ustar headers, 512-byte blocks, two
    zero blocks at the end."""
    assert len(data) % 512 == 0 and data[-1024:] == bytes(1024)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            assert member.isreg() and member.mode == 0o644, member
            out[member.name] = tar.extractfile(member).read()
    assert data[257:263] == b"ustar\0" and data[263:265] == b"00"
    return out


def test_the_tar_writer_makes_tars_that_pythons_tarfile_reads(browser, live):
    open_page(browser, live.url)
    long_dir = "d" * 120  # a path over 100 bytes: the header's prefix field takes the folders
    data = tar_made_in_the_browser(
        browser,
        f"""
        const bytes = (n, seed) => Uint8Array.from({{length: n}}, (_, i) => (i * 31 + seed) % 256);
        const file = (n, seed, name) => new File([bytes(n, seed)], name, {{lastModified: 1.7e12}});
        done(packTar([
          {{path: "top/cat/a.png", file: file(1000, 1, "a.png")}},
          {{path: "top/cat/empty.png", file: file(0, 2, "empty.png")}},
          {{path: "top/dog/block.png", file: file(512, 3, "block.png")}},
          {{path: "top/dög/ünï.png", file: file(513, 4, "ünï.png")}},
          {{path: "top/{long_dir}/x.png", file: file(7, 5, "x.png")}},
        ]));
        """,
    )

    def expected(n: int, seed: int) -> bytes:
        return bytes((i * 31 + seed) % 256 for i in range(n))

    assert members(data) == {
        "top/cat/a.png": expected(1000, 1),
        "top/cat/empty.png": b"",
        "top/dog/block.png": expected(512, 3),
        "top/dög/ünï.png": expected(513, 4),
        f"top/{long_dir}/x.png": expected(7, 5),
    }
    # Headers and padding only: 5 headers, 2+0+1+2+1 data blocks, 2 end blocks.
    assert len(data) == 512 * (5 + 6 + 2)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        assert {m.mtime for m in tar.getmembers()} == {1_700_000_000}

    # A path no ustar header can hold is refused, not cut short.
    refused = browser.execute_script(
        """try { packTar([{path: "x/" + "n".repeat(101), file: new File(["1"], "n")}]); }
        catch (err) { return err.message; } return null;"""
    )
    assert refused and "too long" in refused


def test_a_picked_folder_is_packed_below_its_own_name(browser, live, tmp_path):
    """Chromium's webkitdirectory input takes a folder path from send_keys, as a user's pick."""
    open_page(browser, live.url)
    folder = image_folder(tmp_path / "pets", {"cat": 4, "dog": 4})
    (folder / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are left out
    (folder / "notes.txt").write_text("not an image")  # the server skips these
    browser.find_element(By.ID, "learn-folder").send_keys(str(folder))
    WebDriverWait(browser, 10).until(lambda d: text(d, "learn-picked"))
    assert text(browser, "learn-picked").startswith("pets: 9 files (")
    assert text(browser, "learn-picked").endswith("in 2 label folders: cat, dog")
    assert browser.find_element(By.ID, "learn-name").get_attribute("value") == "pets"

    data = tar_made_in_the_browser(browser, "done(packTar(learnSource.entries));")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".DS_Store")
    assert members(data) == {str(p.relative_to(tmp_path)): p.read_bytes() for p in files}


def fill(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def pick_and_name(browser, folder: Path, name: str, token: str | None = TOKEN) -> None:
    browser.find_element(By.ID, "learn-folder").send_keys(str(folder))
    WebDriverWait(browser, 10).until(lambda d: text(d, "learn-picked"))
    fill(browser, "learn-name", name)
    fill(browser, "token", token or "")


TINY = {"epochs": "1", "min_steps": "0", "input_size": "32"}  # a job of a few seconds


def tiny_options(browser) -> None:
    fill(browser, "learn-epochs", TINY["epochs"])
    browser.find_element(By.CSS_SELECTOR, "#learn-advanced summary").click()
    fill(browser, "learn-min-steps", TINY["min_steps"])
    fill(browser, "learn-input-size", TINY["input_size"])


def the_jobs_of(url: str, task: str) -> list[dict]:
    return [j for j in httpx.get(f"{url}/jobs").json()["jobs"] if j["task"] == task]


def drop_task(url: str, task: str) -> None:
    r = httpx.delete(f"{url}/tasks/{task}", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code in (204, 404), r.text


def test_a_folder_learned_on_the_page_is_selected_in_the_predict_form(browser, live, tmp_path):
    open_page(browser, live.url)
    folder = image_folder(tmp_path / "shapes", {"round": 4, "square": 4})
    pick_and_name(browser, folder, "shapes-web")
    tiny_options(browser)
    fill(browser, "learn-description", "Round or square, from the page")
    try:
        browser.find_element(By.ID, "learn-go").click()
        assert wait_panel(browser, *FINAL, timeout_s=180) == "succeeded", text(
            browser, "learn-error"
        )
        (job,) = the_jobs_of(live.url, "shapes-web")
        assert job["state"] == "succeeded" and job["options"]["epochs"] == 1
        assert job["options"]["min_steps"] == 0 and job["options"]["input_size"] == 32
        assert job["data"]["classes"] == ["round", "square"] and job["data"]["images"] == 8

        # What the page shows: the state, a full bar, the result beside the baseline's.
        assert text(browser, "learn-state") == "succeeded"
        bar = browser.find_element(By.ID, "learn-progress")
        assert bar.get_attribute("value") == bar.get_attribute("max") == "1"
        result = job["result"]
        assert text(browser, "learn-accuracy") == f"{100 * result['accuracy']:.1f}%"
        assert text(browser, "learn-baseline") == f"{100 * result['baseline_accuracy']:.1f}%"
        assert text(browser, "learn-sparsity") == f"{100 * result['sparsity']:.1f}%"
        assert "KiB" in text(browser, "learn-size") or "bytes" in text(browser, "learn-size")
        assert "8 images, 2 labels: round, square" in text(browser, "learn-data")
        assert not browser.find_element(By.ID, "learn-cancel").is_displayed()
        assert not browser.find_element(By.ID, "learn-error").is_displayed()

        # The new task is chosen in the predict form, ready to try.
        picker = Select(browser.find_element(By.ID, "task"))
        assert picker.first_selected_option.get_attribute("value") == "shapes-web"
        assert text(browser, "task-description") == "Round or square, from the page"
        assert text(browser, "task-labels") == "round, square"
        assert "selected in the form above" in text(browser, "learn-next")
        browser.find_element(By.ID, "file").send_keys(str(bundled_image()))
        assert wait_state(browser, "done", "error") == "done"
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#top .label")]
        assert sorted(shown) == ["round", "square"]
        job_box = browser.find_element(By.ID, "learn-job")
        browser.execute_script("arguments[0].scrollIntoView({block: 'end'})", job_box)
        browser.save_screenshot(str(tmp_path / "learned.png"))
    finally:
        drop_task(live.url, "shapes-web")


def test_a_refused_folder_shows_the_servers_words(browser, live, tmp_path):
    open_page(browser, live.url)
    one_class = image_folder(tmp_path / "lonely", {"only": 4})
    pick_and_name(browser, one_class, "lonely-web")
    browser.find_element(By.ID, "learn-go").click()
    assert wait_panel(browser, "error", *FINAL) == "error"
    said = text(browser, "learn-error")
    assert browser.find_element(By.ID, "learn-error").get_attribute("role") == "alert"
    assert "The server cannot learn from these images." in said
    assert "invalid_archive" in said and "HTTP 422" in said and "only" in said, said
    assert not browser.find_element(By.ID, "learn-job").is_displayed()
    assert the_jobs_of(live.url, "lonely-web") == []
    # The button is usable again, for a better folder.
    assert browser.find_element(By.ID, "learn-go").is_enabled()


def test_an_archive_can_be_sent_instead_and_its_refusal_names_the_class(browser, live, tmp_path):
    open_page(browser, live.url)
    browser.find_element(By.ID, "learn-folder").send_keys(
        str(image_folder(tmp_path / "f", {"x": 2}))
    )
    archive = tmp_path / "birds.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(3):
            z.writestr(f"birds/crow/{i}.png", png(i))
        z.writestr("birds/wren/0.png", png(9))  # one image: under min_class_images (2)
    browser.find_element(By.ID, "learn-archive").send_keys(str(archive))
    WebDriverWait(browser, 10).until(lambda d: text(d, "learn-picked").startswith("birds.zip"))
    # The archive replaces the folder picked before, and names the task.
    assert browser.find_element(By.ID, "learn-folder").get_attribute("value") == ""
    assert browser.find_element(By.ID, "learn-name").get_attribute("value") == "birds"
    fill(browser, "token", TOKEN)
    browser.find_element(By.ID, "learn-go").click()
    assert wait_panel(browser, "error", *FINAL) == "error"
    said = text(browser, "learn-error")
    assert "The server cannot learn from these images." in said and "HTTP 422" in said, said
    assert "wren" in said, said
    assert the_jobs_of(live.url, "birds") == []


def test_without_the_admin_token_the_page_says_so(browser, live, tmp_path):
    open_page(browser, live.url)
    folder = image_folder(tmp_path / "pets", {"cat": 2, "dog": 2})
    pick_and_name(browser, folder, "pets-web", token=None)
    browser.find_element(By.ID, "learn-go").click()
    assert wait_panel(browser, "error", *FINAL) == "error"
    said = text(browser, "learn-error")
    assert "needs its admin token" in said and "HTTP 401" in said, said

    fill(browser, "token", "wrong")
    browser.find_element(By.ID, "learn-go").click()
    WebDriverWait(browser, 30).until(lambda d: "HTTP 403" in text(d, "learn-error"))
    assert "The admin token is wrong." in text(browser, "learn-error")
    assert the_jobs_of(live.url, "pets-web") == []


def test_the_token_is_kept_for_the_tab_and_a_bad_name_is_refused_here(browser, live, tmp_path):
    open_page(browser, live.url)
    fill(browser, "token", TOKEN)
    open_page(browser, live.url)  # a reload keeps it (sessionStorage), a new tab would not
    assert browser.find_element(By.ID, "token").get_attribute("value") == TOKEN
    assert browser.execute_script("return localStorage.length") == 0

    folder = image_folder(tmp_path / "pets", {"cat": 2, "dog": 2})
    pick_and_name(browser, folder, "-bad name")
    browser.find_element(By.ID, "learn-go").click()
    assert "task name must be 1 to 64 letters" in text(browser, "learn-error")
    assert panel_state(browser) == "idle"  # nothing was sent


def test_cancel_stops_a_running_job(browser, live, tmp_path):
    open_page(browser, live.url)
    folder = image_folder(tmp_path / "slow", {"a": 4, "b": 4})
    pick_and_name(browser, folder, "slow-web")
    fill(browser, "learn-epochs", "1")
    browser.find_element(By.CSS_SELECTOR, "#learn-advanced summary").click()
    fill(browser, "learn-min-steps", "100000")  # far longer than the test waits
    fill(browser, "learn-input-size", "32")
    try:
        browser.find_element(By.ID, "learn-go").click()
        wait_panel(browser, "queued", "running", "error", *FINAL)
        cancel = browser.find_element(By.ID, "learn-cancel")
        WebDriverWait(browser, 10).until(lambda d: cancel.is_displayed())
        assert browser.find_element(By.ID, "learn-status").get_attribute("aria-live") == "polite"
        cancel.click()
        assert wait_panel(browser, *FINAL, timeout_s=60) == "cancelled"
        assert "The job was cancelled." in text(browser, "learn-error")
        (job,) = the_jobs_of(live.url, "slow-web")
        assert job["state"] == "cancelled"
        assert httpx.get(f"{live.url}/tasks/slow-web").status_code == 404
        assert browser.find_element(By.ID, "learn-go").is_enabled()
    finally:
        deadline = time.monotonic() + 30  # a job left running would hold the only trainer
        while any(j["state"] not in FINAL for j in the_jobs_of(live.url, "slow-web")):
            assert time.monotonic() < deadline, "the job did not stop"
            time.sleep(0.2)


FAKE_EVENTS = """
class FakeSource extends EventTarget {
  constructor(url) { super(); this.url = url; this.readyState = 1; FakeSource.made.push(this); }
  close() { this.readyState = 2; }
}
FakeSource.CLOSED = 2;
FakeSource.made = [];
window.EventSource = FakeSource;
window.sent = (job) => FakeSource.made.at(-1).dispatchEvent(
  new MessageEvent("job", {data: JSON.stringify(job)}));
window.job = (state, more) => Object.assign({id: "j1", task: "toys", state,
  progress: {step: 0, steps: 0, epoch: 0, epochs: 0, loss: null}, result: null, error: null,
  data: {classes: ["ball", "car", "doll"], images: 30, skipped: 2}}, more);
"""


def test_progress_and_a_failure_as_the_events_tell_them(browser, live):
    """The page's view of a job's events, with the stream played by a stand-in EventSource:
    the bar follows step/steps, a failed job's message is shown, the stream is closed."""
    open_page(browser, live.url)
    browser.execute_script(FAKE_EVENTS + "follow(job('queued'));")
    assert panel_state(browser) == "queued" and text(browser, "learn-state") == "queued"
    assert browser.execute_script("return EventSource.made[0].url") == "/jobs/j1/events"
    bar = browser.find_element(By.ID, "learn-progress")
    assert browser.execute_script("return arguments[0].matches(':indeterminate')", bar)
    assert text(browser, "learn-progress-text") == "waiting for a free trainer…"
    assert (
        text(browser, "learn-data")
        == "30 images, 3 labels: ball, car, doll (2 other files skipped)"
    )
    assert browser.find_element(By.ID, "learn-cancel").is_displayed()

    progress = {"step": 3, "steps": 10, "epoch": 1, "epochs": 2, "loss": 0.5}
    browser.execute_script(f"sent(job('running', {{progress: {progress}}}));")
    assert panel_state(browser) == "running"
    assert (bar.get_attribute("value"), bar.get_attribute("max")) == ("3", "10")
    assert not browser.execute_script("return arguments[0].matches(':indeterminate')", bar)
    assert text(browser, "learn-progress-text") == "epoch 1 of 2 · step 3 of 10 · loss 0.5000"
    browser.execute_script("sent(Object.assign(job('running'), {id: 'another'}));")
    assert bar.get_attribute("value") == "3"  # another job's event is not this one's

    error = {"code": "training_failed", "message": "the trainer ran out of memory"}
    browser.execute_script(f"sent(job('failed', {{progress: {progress}, error: {error}}}));")
    assert wait_panel(browser, *FINAL) == "failed"
    said = text(browser, "learn-error")
    assert "The job failed." in said and "the trainer ran out of memory" in said, said
    assert browser.execute_script("return EventSource.made[0].readyState") == 2
    assert not browser.find_element(By.ID, "learn-cancel").is_displayed()
    assert not browser.find_element(By.ID, "learn-result").is_displayed()


def test_a_stream_the_browser_gives_up_on_is_replaced_by_polling(browser, live):
    open_page(browser, live.url)
    fill(browser, "token", TOKEN)
    asked = browser.execute_script(
        FAKE_EVENTS
        + """
        window.asked = [];
        window.fetch = async (url, init) => {
          window.asked.push([url, (init && init.headers) || {}]);
          return new Response(JSON.stringify(job('cancelled',
            {error: {code: "cancelled", message: "cancelled by DELETE /jobs/j1"}})),
            {status: 200, headers: {"content-type": "application/json"}});
        };
        follow(job('running'));
        const source = EventSource.made[0];
        source.readyState = 2;
        source.dispatchEvent(new Event("error"));
        return window.asked;"""
    )
    assert wait_panel(browser, *FINAL) == "cancelled"
    assert asked == [["/jobs/j1", {"authorization": f"Bearer {TOKEN}"}]]
    assert "The job was cancelled." in text(browser, "learn-error")
