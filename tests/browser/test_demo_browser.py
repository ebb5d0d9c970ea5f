"""The demo in a real browser (Debian's Chromium driven by Playwright) and under concurrent API clients.

Skips when Chromium or Playwright is missing, unless ``CARSEARCH_REQUIRE_BROWSER=1`` (CI sets it).
The screenshot goes to ``test-artifacts/demo.png``; with ``CARSEARCH_UPDATE_DOCS=1`` also to ``docs/demo.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.demo_fixtures import build_demo_indexes

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = pytest.mark.browser
CAPTION = re.compile(r"^#\d+ class_\d · \d\.\d{3}$")
K = 5


def _missing_browser() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser_ready() -> None:
    reason = _missing_browser()
    if reason:
        if os.environ.get("CARSEARCH_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def demo_server(
    browser_ready: None, tmp_path_factory: pytest.TempPathFactory, tiny_yolo: Path
) -> Iterator[tuple[str, Path]]:
    """``carsearch demo`` in a subprocess on a free loopback port, over a cropped and a raw index."""
    gallery, cropped, raw = build_demo_indexes(tmp_path_factory.mktemp("browser"), tiny_yolo)
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "demo.log"
    command = [
        sys.executable,
        "-m",
        "carsearch.cli",
        "demo",
        str(cropped),
        "--raw-index",
        str(raw),
        "--port",
        str(port),
    ]
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, gallery
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _search(page, upload: Path) -> None:  # noqa: ANN001 - playwright Page
    page.locator("#query input[type=file]").set_input_files(str(upload))
    page.locator("#query img").first.wait_for(timeout=30_000)
    page.locator("#search").click()


def test_upload_search_and_see_results_in_chromium(demo_server: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, gallery = demo_server
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url, wait_until="load")
            page.locator("#search").wait_for(timeout=60_000)

            _search(page, gallery / "class_1" / "img_0.jpg")
            page.wait_for_function(f"document.querySelectorAll('#hits .caption-label').length === {K}", timeout=120_000)
            captions = page.locator("#hits .caption-label").all_inner_texts()
            assert len(captions) == K and all(CAPTION.match(c.strip()) for c in captions), captions
            assert page.locator("#hits img").count() == K
            page.wait_for_function(f"document.querySelectorAll('#raw-hits img').length === {K}", timeout=30_000)
            assert page.locator("#raw-hits").is_visible()
            assert "Found a car" in page.locator("#status").inner_text()
            assert page.locator("#query-cam img").count() == 1 and page.locator("#photo-cams img").count() == 2
            assert "inside the car box" in page.locator("#attention").inner_text()
            time.sleep(1)  # let the images finish painting
            artifacts = ROOT / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "demo.png"), full_page=True)
            if os.environ.get("CARSEARCH_UPDATE_DOCS") == "1":
                shutil.copy(artifacts / "demo.png", ROOT / "docs" / "demo.png")

            broken = tmp_path / "broken.jpg"
            broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
            page.locator("#query input[type=file]").set_input_files(str(broken))
            page.locator("#search").click()
            page.wait_for_function(
                "document.querySelector('#status').innerText.includes('Could not use that upload')", timeout=60_000
            )
            _search(page, gallery / "class_2" / "img_1.jpg")  # still serving after the bad upload
            page.wait_for_function(
                "document.querySelector('#status').innerText.includes('results')"
                " && document.querySelector('#raw-hits .caption-label')?.innerText.startsWith('#1 class_2 · 1.000')",
                timeout=120_000,
            )
        finally:
            browser.close()
    outside = [u for u in requests if not u.startswith((url.rstrip("/"), "data:", "blob:"))]
    assert not outside, f"the page requested resources outside the machine: {outside}"


def test_four_concurrent_api_clients_all_get_their_answer(demo_server: tuple[str, Path]) -> None:
    from gradio_client import Client, handle_file

    url, gallery = demo_server
    client = Client(url, verbose=False)
    queries = [gallery / f"class_{c}" / f"img_{i}.jpg" for c, i in [(0, 0), (1, 1), (2, 2), (0, 3)]]

    def ask(query: Path) -> tuple[Path, tuple]:
        return query, client.predict(handle_file(str(query)), 3, 0.25, api_name="/search")

    def captions(answer: tuple) -> tuple[list[str], list[str]]:
        status, _annotated, _crop, hits, raw_hits = answer[:5]
        assert "3 results" in status
        return [h["caption"] for h in hits], [h["caption"] for h in raw_hits]

    one_by_one = {query: captions(ask(query)[1]) for query in queries}
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(ask, queries))
    for query, answer in together:
        hits, raw_hits = captions(answer)
        assert len(hits) == 3 and len(raw_hits) == 3
        assert all(CAPTION.match(c) for c in hits + raw_hits), hits + raw_hits
        assert raw_hits[0].startswith(f"#1 {query.parent.name} · 1.000")  # the raw index holds the query itself
        assert (hits, raw_hits) == one_by_one[query]  # each client got its own answer, as when asked alone
