"""The web page in a real headless Chromium against a real `vidret serve` process on 127.0.0.1.

Needs Debian's chromium + chromium-driver and the selenium package; skipped cleanly when any is missing:

    apt-get install -y chromium chromium-driver && pip install selenium

Set VIDRET_SCREENSHOT=path/to/file.png to keep a copy of the screenshot (benchmarks/search_page.png).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
        reason="needs chromium + chromedriver (apt-get install chromium chromium-driver) and selenium (pip)",
    ),
]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(
    built_index: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`python -m vidret serve` in a subprocess, with the MSR-VTT index as a second collection when present."""
    import httpx

    specs = [f"colours={built_index}"]
    with contextlib.suppress(pytest.skip.Exception):
        specs.append(f"msrvtt={request.getfixturevalue('msrvtt_index')}")
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidret", "serve", *specs, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            assert proc.poll() is None, f"vidret serve exited; see {log.name}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            pytest.fail("vidret serve did not come up in 90 s")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # explicit driver: no download
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 20.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def result_ids(driver) -> list[str]:
    """The video ids shown, read in one script call (the list is re-rendered on every search)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#results .result')].map(e => e.dataset.videoId)"
    )


def thumbnails_loaded(driver) -> bool:
    return bool(
        driver.execute_script(
            "const imgs = [...document.querySelectorAll('#results img.strip')];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"
        )
    )


def test_search_page_end_to_end(server: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    browser.get(server + "/")
    wait_for(browser, lambda d: len(Select(d.find_element(By.ID, "index")).options) >= 1)
    names = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "index")).options]
    assert names[0] == "colours"

    box = browser.find_element(By.ID, "q")
    box.send_keys("a red ball", Keys.ENTER)
    wait_for(browser, lambda d: len(result_ids(d)) == 8)
    wait_for(browser, thumbnails_loaded)
    assert "8 result(s) from colours" in browser.find_element(By.ID, "status").text
    first_img = browser.find_element(By.CSS_SELECTOR, "#results .result img.strip")
    assert browser.execute_script("return arguments[0].naturalWidth", first_img) == 4 * 96 - 2  # a 4-frame strip
    assert "q=a+red+ball" in browser.current_url

    # an empty query is refused in the page, without a request
    box.clear()
    box.send_keys(" ", Keys.ENTER)
    wait_for(browser, lambda d: "Type what" in d.find_element(By.ID, "status").text)

    if "msrvtt" in names:  # the second collection: another adapter over the same backbone, real clips
        box.clear()
        box.send_keys("a man is singing on stage")
        Select(browser.find_element(By.ID, "index")).select_by_value("msrvtt")  # searches on change
        wait_for(browser, lambda d: (ids := result_ids(d)) and all(i.startswith("video") for i in ids))
        wait_for(browser, thumbnails_loaded)
        assert "from msrvtt" in browser.find_element(By.ID, "status").text

    shot = tmp_path / "search_page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("VIDRET_SCREENSHOT"):
        shutil.copy(shot, os.environ["VIDRET_SCREENSHOT"])

    # a click plays the clip in the page's player
    browser.find_element(By.CSS_SELECTOR, "#results .result").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "player").is_displayed())
    src = browser.execute_script("return document.getElementById('video').currentSrc")
    assert "/videos/" in src
    wait_for(
        browser,
        lambda d: d.execute_script("const v = document.getElementById('video'); return v.error || v.readyState >= 1"),
    )
    assert browser.execute_script("return document.getElementById('video').error") is None
    assert browser.execute_script("return document.getElementById('video').duration") > 1.0
    browser.save_screenshot(str(tmp_path / "search_page_player.png"))
    browser.find_element(By.ID, "close").click()
    wait_for(browser, lambda d: not d.find_element(By.ID, "player").is_displayed())
