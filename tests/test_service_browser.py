"""The search page in a real headless Chromium (the system's chromium + chromedriver, driven by
Selenium) against a real server on loopback: upload a photo of the index, wait for both result
columns, check the first result is that photo with its thumbnail, and keep a screenshot."""
from __future__ import annotations

import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (pip install 'sgengine[serve]') is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the serve extra) is not installed")

from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from sgengine import Engine  # noqa: E402
from sgengine.indexing import build_index  # noqa: E402
from sgengine.service.app import ServiceConfig, create_app  # noqa: E402

NAMES = ("astronaut", "coffee", "chelsea", "rocket")


def _chromium() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no system Chromium and chromedriver (Debian: apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    path, driver = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=ChromeService(driver), options=opts)
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture(scope="module")
def served(default_bundle, photos, tmp_path_factory):
    """A real server over a small index of real photos, with the folder for thumbnails."""
    root = tmp_path_factory.mktemp("page_photos")
    for name in NAMES:
        img = Image.fromarray(photos[name])
        img.thumbnail((256, 256))
        (root / name).mkdir()
        img.save(root / name / "full.jpg", quality=92)
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / name / "flip.jpg", quality=90)
    index_dir = tmp_path_factory.mktemp("page_index") / "index"
    build_index(Engine.load(default_bundle), root, index_dir, progress=False)
    engine = Engine.load(default_bundle, index=index_dir)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServiceConfig(images=str(root))), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while not _ready(url):
        assert time.monotonic() < deadline, "the server did not get ready"
        time.sleep(0.1)
    try:
        yield url, engine, root
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def test_page_shows_the_photo_first_before_and_after_reranking(browser, served, tmp_path, record_property):
    url, engine, root = served
    query = root / "coffee" / "full.jpg"
    want = engine.search(query, k=8)
    assert want[0].ids[0] == "coffee/full.jpg"  # the photo itself, as the engine ranks it in-process

    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(query))
    WebDriverWait(browser, 90).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status").text
    shot = Path(tmp_path) / "search_page.png"
    browser.save_screenshot(str(shot))
    record_property("screenshot", str(shot))
    print(f"screenshot of the search page: {shot}")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", status

    for column, rerank in (("global", False), ("reranked", True)):
        hits = browser.find_elements(By.CSS_SELECTOR, f"#{column} .hit")
        expected = engine.search(query, k=8, rerank=rerank)[0]
        assert [h.get_attribute("data-id") for h in hits] == expected.ids, column
        first = hits[0]
        assert first.get_attribute("data-id") == "coffee/full.jpg"
        img = first.find_element(By.TAG_NAME, "img")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
        shown = float(first.find_element(By.CLASS_NAME, "score").text)
        assert abs(shown - float(expected.scores[0])) < 1e-4
    stages = browser.find_element(By.ID, "timings").text
    for stage in ("embed", "search", "rerank"):
        assert stage in stages, stages
    assert shot.stat().st_size > 10_000
    assert browser.find_element(By.ID, "reranked-title").text.endswith("(faithful)")  # the server's default

    # The page's rerank choice: adaptive, the same photo again.
    Select(browser.find_element(By.ID, "mode")).select_by_value("adaptive")
    browser.execute_script("document.body.dataset.state = 'idle'; arguments[0].value = '';",
                           browser.find_element(By.ID, "file"))
    browser.find_element(By.ID, "file").send_keys(str(query))
    WebDriverWait(browser, 90).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
    assert browser.find_element(By.ID, "reranked-title").text.endswith("(adaptive)")
    hits = browser.find_elements(By.CSS_SELECTOR, "#reranked .hit")
    assert [h.get_attribute("data-id") for h in hits] == engine.search(query, k=8, rerank="adaptive")[0].ids
