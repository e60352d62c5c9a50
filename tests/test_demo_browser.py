"""The web demo in a real browser: `prg-hub demo` on a free port, driven by headless Chromium (Debian's `chromium`
and `chromium-driver`) through Selenium.

Each tab is checked against the package itself: the labels shown for uploaded files against `prg-hub classify
--json`, the trajectory strip and the samples pixel for pixel against `prg_hub.demo.PRGDemo` in this process.
A screenshot of each tab is saved in the test's tmp_path, or as docs/images/demo-{classify,trajectory,generate}.png
with `PRG_DEMO_SCREENSHOTS=docs/images python -m pytest tests/test_demo_browser.py` (the README's pictures).
"""

import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prg_hub.demo import PRGDemo, read_upload

pytestmark = pytest.mark.needs_browser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
# Uploaded in this order; the page shows the last one in the screenshot.
UPLOADED = ["cat-6360.png", "truck-0315.png", "horse-7919.png", "bird-0196.png", "deer-5879.png", "ship-3821.png",
            "dog-7213.png", "frog-9295.png"]
FIRST_EXAMPLE = "airplane-6683.png"  # chosen when the page opens
VIEWPORT = {"width": 1100, "height": 800}
STARTUP_SECONDS = 120
WAIT_SECONDS = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """`prg-hub demo --port N` (the shipped model) running in its own process; its URL once it answers."""
    executable = shutil.which("prg-hub") or pytest.fail("the prg-hub console script is not installed")
    port = free_port()
    log_path = tmp_path_factory.mktemp("demo") / "demo.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([executable, "demo", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"prg-hub demo did not start (exit status {process.poll()}):\n{log_path.read_text()}")
        time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with a 1100×800 viewport."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the network requests, read by a test
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={VIEWPORT['width']},{VIEWPORT['height']}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**VIEWPORT, "deviceScaleFactor": 1,
                                                                  "mobile": False})
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, demo_url):
    """The demo freshly opened, once it has classified the example it chooses on opening."""
    browser.get(demo_url)
    wait_for_text(browser, "classify-status", lambda text: text.startswith(f"{FIRST_EXAMPLE}:"))
    return browser


@pytest.fixture(scope="module")
def work() -> PRGDemo:
    """The demo's work in this process, to compute what the page must show."""
    return PRGDemo()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("PRG_DEMO_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


def save_screenshot(driver, folder: Path, tab: str) -> Path:
    """The viewport as `folder/demo-{tab}.png`, reduced to 256 colours (a small file for the README)."""
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
    path = folder / f"demo-{tab}.png"
    folder.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256).save(path, optimize=True)
    return path


def wait_for_text(driver, element_id: str, condition, timeout: float = WAIT_SECONDS) -> str:
    """The text of the element `element_id` once `condition(text)` holds."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def satisfied(driver):
        elements = driver.find_elements(By.ID, element_id)
        return elements and condition(elements[0].text) and elements[0].text

    try:
        return WebDriverWait(driver, timeout).until(satisfied)
    except Exception:
        shown = [element.text for element in driver.find_elements(By.ID, element_id)]
        pytest.fail(f"#{element_id} never met the condition; it shows {shown}")


def image_source(driver, element_id: str) -> str | None:
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} img")
    return images[0].get_attribute("src") if images else None


def wait_for_new_image(driver, element_id: str, previous: str | None) -> tuple[str, np.ndarray]:
    """The URL and pixels of the image shown in `element_id` once its URL differs from `previous`."""
    from selenium.webdriver.support.ui import WebDriverWait

    source = WebDriverWait(driver, WAIT_SECONDS).until(
        lambda driver: (src := image_source(driver, element_id)) and src != previous and src)
    with urllib.request.urlopen(source, timeout=30) as response:
        return source, np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def shown_labels(driver, element_id: str) -> list[tuple[str, float]]:
    """(label, probability) of each row of a gradio Label, top first; the probability is the bar's exact value."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} button.confidence-set")
    return [(row.find_element(By.CSS_SELECTOR, "dt").text,
             float(row.find_element(By.CSS_SELECTOR, "meter").get_attribute("value"))) for row in rows]


def upload(driver, path: Path) -> None:
    """Put `path` into the Classify tab's file input, clearing the file it holds first."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not driver.find_elements(By.CSS_SELECTOR, "#classify-upload input[type=file]"):
        driver.find_element(By.CSS_SELECTOR, "#classify-upload button[aria-label=Clear]").click()
    file_input = WebDriverWait(driver, WAIT_SECONDS).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, "#classify-upload input[type=file]"))[0]
    file_input.send_keys(str(path))


def open_tab(driver, tab: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, f"tab-{tab}-button").click()


def test_the_page_loads_nothing_from_outside_the_machine(page, demo_url):
    requests = [json.loads(entry["message"])["message"] for entry in page.get_log("performance")]
    urls = {request["params"]["request"]["url"] for request in requests
            if request["method"] == "Network.requestWillBeSent"}
    assert demo_url in urls
    assert {url for url in urls if not url.startswith((demo_url, "data:", "blob:"))} == set()


def test_uploaded_images_show_the_labels_of_prg_hub_classify(page, screenshots):
    paths = [EXAMPLES / name for name in UPLOADED]
    result = subprocess.run([shutil.which("prg-hub"), "classify", *map(str, paths), "--json"], capture_output=True,
                            text=True, timeout=300, check=True)
    expected = {Path(record["path"]).name: record["predictions"]
                for record in map(json.loads, result.stdout.splitlines())}
    assert sorted(expected) == sorted(UPLOADED)
    for path in paths:
        upload(page, path)
        status = wait_for_text(page, "classify-status", lambda text: text.startswith(f"{path.name}:"))
        shown = shown_labels(page, "classify-labels")
        predictions = expected[path.name]
        assert [label for label, _ in shown] == [p["label"] for p in predictions], path.name
        assert [score for _, score in shown] == pytest.approx([p["score"] for p in predictions], rel=1e-5)
        assert status == f"{path.name}: {predictions[0]['label']} ({predictions[0]['score']:.1%})"
    save_screenshot(page, screenshots, "classify")


def test_bad_uploads_get_a_message_in_the_page(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    (tmp_path / "notes.png").write_text("not an image, named like one")
    (tmp_path / "broken.png").write_bytes((EXAMPLES / "dog-6417.png").read_bytes()[:600])
    Image.new("L", (8000, 6000)).save(tmp_path / "huge.png")  # 48 megapixels, 47 KB
    messages = {
        "notes.png": "notes.png is not an image the demo can read (cannot identify image file 'notes.png').",
        "broken.png": "broken.png is not an image the demo can read (",
        "huge.png": "huge.png is too large (8000×6000 = 48 megapixels): the demo takes images of at most 40 "
                    "megapixels. Downscale it and try again.",
    }
    for name, message in messages.items():
        upload(page, tmp_path / name)
        status = wait_for_text(page, "classify-status", lambda text: name in text)
        assert status.startswith("Cannot use this file.") and message in status
        assert shown_labels(page, "classify-labels") == []
    (tmp_path / "notes.txt").write_text("not an image")
    upload(page, tmp_path / "notes.txt")  # refused by the page itself: the file input asks for images
    WebDriverWait(page, WAIT_SECONDS).until(lambda driver: any(
        "Invalid file type: notes.txt. Only image allowed." in toast.text
        for toast in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")))
    assert "Traceback" not in page.page_source


def test_moving_the_step_slider_changes_the_trajectory_strip(page, work, screenshots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_tab(page, "trajectory")
    steps = work.config.num_steps
    wait_for_text(page, "trajectory-status", lambda text: text.startswith(f"{steps} euler steps to feature_t = 1:"))
    before, strip_before = wait_for_new_image(page, "trajectory-strip", None)
    slider = page.find_element(By.CSS_SELECTOR, "#trajectory-steps input[type=range]")
    # Press at the slider's left end (1 step) and drag it 12 pixels to the right (about 14 steps of 1,000).
    ActionChains(page).move_to_element_with_offset(slider, -slider.size["width"] // 2 + 2, 0).click_and_hold() \
        .move_by_offset(12, 0).release().perform()
    new_steps = int(page.find_element(By.CSS_SELECTOR, "#trajectory-steps input[type=number]").get_attribute("value"))
    assert new_steps != steps and new_steps <= 50, "the slider did not move, or moved too far for a quick test"
    status = wait_for_text(page, "trajectory-status", lambda text: text.startswith(f"{new_steps} euler steps"))
    _, strip_after = wait_for_new_image(page, "trajectory-strip", before)
    assert strip_after.shape != strip_before.shape or not np.array_equal(strip_after, strip_before)
    expected = work.trajectory(read_upload(EXAMPLES / FIRST_EXAMPLE), new_steps, 1.0)
    assert np.array_equal(strip_after, np.asarray(expected.strip))
    shown = shown_labels(page, "trajectory-labels")
    assert [label for label, _ in shown] == [p["label"] for p in expected.predictions]
    assert [score for _, score in shown] == pytest.approx([p["score"] for p in expected.predictions], rel=1e-5)
    top, times = expected.predictions[0], ", ".join(f"{t:.3g}" for t in expected.times)
    assert status == (f"{new_steps} euler steps to feature_t = 1: {top['label']} ({top['score']:.1%}). "
                      f"Shown: t = {times}.")
    save_screenshot(page, screenshots, "trajectory")


def test_generate_draws_the_seeded_samples(page, work, screenshots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_tab(page, "generate")
    for element_id, value in (("generate-steps", "5"), ("generate-seed", "3")):
        field = page.find_element(By.CSS_SELECTOR, f"#{element_id} input[type=number]")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(value, Keys.TAB)
    page.find_element(By.ID, "generate-button").click()
    wait_for_text(page, "generate-status", lambda text: text == "16 samples, 5 euler steps, seed 3.")
    _, samples = wait_for_new_image(page, "generate-samples", None)
    assert np.array_equal(samples, np.asarray(work.generate(16, 5, seed=3)))
    save_screenshot(page, screenshots, "generate")
