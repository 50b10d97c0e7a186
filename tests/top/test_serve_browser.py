"""The page of `lare2 serve` in a real browser (headless Chromium driven by selenium): images picked through
the page come back with the verdicts `Detector.score` gives the same files; names are shown, never run; the
heatmap opens from the keyboard. The screenshot it takes is the README's (docs/serve.png).

Needs Chromium and its driver (Debian: chromium, chromium-driver); without them the test skips, except
under LARE2_REQUIRE_SYSTEM_TOOLS=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers.bad_images import GALLERY
from tests.helpers.system_tools import require_programs
from tests.helpers.tiny_run import build_tiny_run
from tests.top.test_serve import refused, wait_for

pytestmark = pytest.mark.slow
# README's picture of the page; a run refreshes it only when asked (LARE2_UPDATE_SCREENSHOT=1), so tests keep the
# checkout clean
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "serve.png"
THRESHOLD = "0.72"
"""Between the tiny run's p(fake) values, so that the page shows both verdicts."""
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">.png"
"""A file name that would run script if the page put names into HTML."""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, run folder, test images) of `lare2 serve` on a tiny run, as a subprocess on a private port."""
    root = tmp_path_factory.mktemp("serve-browser")
    run, images = build_tiny_run(root, n_test=6)
    log = open(root / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "lare2.serve.cli", str(run), "--port", "0",
                               "--device", "cpu", "--workers", "0", "--threshold", THRESHOLD],
                              stdout=subprocess.PIPE, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        # the first line says where it listens (--port 0: a free port the system chose)
        heard = re.match(r"listening on http://127\.0\.0\.1:(\d+)/", server.stdout.readline().decode())
        assert heard, "lare2 serve did not say where it listens"
        port = int(heard[1])
        threading.Thread(target=lambda: log.write(server.stdout.read()), daemon=True).start()
        wait_for(lambda: server.poll() is None and not refused(port), "the server to listen", 120)
        yield f"http://127.0.0.1:{port}", run, images
    finally:
        server.terminate()
        server.wait(120)
        log.close()


@pytest.fixture
def browser(tmp_path):
    programs = require_programs("chromium", "chromedriver", packages=("chromium", "chromium-driver"))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = programs["chromium"]
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,860"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=programs["chromedriver"]))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_shows_the_detectors_verdicts(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from lare2 import Detector

    url, run, images = served
    files = list(images)
    for name, data in (("not_an_image.png", GALLERY["not_an_image.png"][0]), (HOSTILE_NAME, images[0].read_bytes())):
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    expected = Detector.from_run(run, device="cpu", num_workers=0, threshold=float(THRESHOLD)).score(files)

    browser.get(url)
    wait = WebDriverWait(browser, 120, poll_frequency=0.2)
    wait.until(lambda d: d.find_element(By.ID, "run-info").text.startswith(f"Run {run.name}"))
    title = browser.title
    browser.find_element(By.ID, "pick").send_keys("\n".join(str(f) for f in files))
    wait.until(lambda d: d.find_element(By.ID, "summary").get_attribute("data-pending") == "0"
               and len(d.find_elements(By.CSS_SELECTOR, ".result")) == len(files))

    cards = browser.find_elements(By.CSS_SELECTOR, ".result")
    for card, path, want in zip(cards, files, expected):
        assert card.find_element(By.CSS_SELECTOR, ".name").text == path.name  # shown as text, in input order
        if want.status == "ok":
            assert card.get_attribute("data-verdict") == ("fake" if want.is_fake else "real")
            assert float(card.get_attribute("data-p-fake")) == pytest.approx(want.p_fake, abs=1e-6)
        else:
            assert card.get_attribute("data-verdict") == "error"
            assert card.find_element(By.CSS_SELECTOR, ".why").text  # the reason, in words
    assert "not an image" in cards[-2].find_element(By.CSS_SELECTOR, ".why").text
    assert "is not a GenImage-style file name" in cards[-1].find_element(By.CSS_SELECTOR, ".why").text
    assert browser.title == title and not browser.find_elements(By.CSS_SELECTOR, 'img[src="x"]')  # nothing ran
    fake = sum(bool(r.is_fake) for r in expected if r.status == "ok")
    real = sum(r.status == "ok" for r in expected) - fake
    assert browser.find_element(By.ID, "summary").text == f"{fake} fake · {real} real · 2 errors"
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("LARE2_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)

    # the heatmap, from the keyboard: focus the first card, Enter opens it, Escape closes it
    first = cards[0]
    browser.execute_script("arguments[0].focus()", first)
    first.send_keys(Keys.ENTER)
    dialog = browser.find_element(By.ID, "heatmap")
    wait.until(lambda d: d.execute_script("const i = document.getElementById('heatmap-image');"
                                          "return !i.hidden && i.complete && i.naturalWidth > 0"))
    assert dialog.get_attribute("open") is not None
    assert browser.find_element(By.ID, "heatmap-title").text.startswith(files[0].name)
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait.until(lambda d: d.find_element(By.ID, "heatmap").get_attribute("open") is None)
