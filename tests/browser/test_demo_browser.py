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


MAPS_READY = "document.querySelectorAll('#photo-cams img').length === 2"
HITS_READY = f"document.querySelectorAll('#hits .caption-label').length === {K}"
# Records when each first became true, from DOM mutations (a check right after the hits would race the maps).
ORDER_WATCH = f"""() => {{
  window.__seen = {{}};
  const note = () => {{
    const now = performance.now();
    if (window.__seen.hits === undefined && {HITS_READY}) window.__seen.hits = now;
    if (window.__seen.maps === undefined && {MAPS_READY}) window.__seen.maps = now;
  }};
  new MutationObserver(note).observe(document.body, {{childList: true, subtree: true, attributes: true}});
}}"""


def _crop_src(page) -> str:  # noqa: ANN001 - playwright Page
    return page.locator("#crop img").first.get_attribute("src") or ""


def _whole_photo_is_shown(page) -> None:  # noqa: ANN001 - playwright Page
    """Each whole-photo map is drawn whole: its rendered box holds the picture at its own aspect ratio, inside
    the panel and the page (not a blank strip, not clipped)."""
    boxes = page.evaluate(
        """() => [...document.querySelectorAll('#photo-cams img')].map(img => {
            const r = img.getBoundingClientRect(), p = img.closest('#photo-cams').getBoundingClientRect();
            return {w: r.width, h: r.height, nw: img.naturalWidth, nh: img.naturalHeight,
                    fit: getComputedStyle(img).objectFit,
                    inside: r.left >= p.left - 1 && r.right <= p.right + 1
                            && r.top >= p.top - 1 && r.bottom <= p.bottom + 1};
        })"""
    )
    assert len(boxes) == 2, boxes
    for box in boxes:
        assert box["nw"] > 0 and box["nh"] > 0 and box["w"] >= 120 and box["h"] >= 80, box
        assert box["inside"], box
        shown = min(box["w"] / box["nw"], box["h"] / box["nh"])  # object-fit: contain draws it at this scale
        assert box["fit"] == "contain" or abs(box["w"] / box["h"] - box["nw"] / box["nh"]) < 0.05, box
        assert shown * box["nw"] >= 0.5 * box["w"] or shown * box["nh"] >= 0.5 * box["h"], box


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

            page.evaluate(ORDER_WATCH)
            _search(page, gallery / "class_1" / "img_0.jpg")
            page.wait_for_function(HITS_READY, timeout=120_000)
            page.wait_for_function(MAPS_READY, timeout=120_000)
            seen = page.evaluate("window.__seen")
            # answer first: the hits were on the page before the maps (the maps are a chained event)
            assert seen["hits"] < seen["maps"], f"the maps arrived with the answer, not after it: {seen}"
            captions = page.locator("#hits .caption-label").all_inner_texts()
            assert len(captions) == K and all(CAPTION.match(c.strip()) for c in captions), captions
            assert page.locator("#hits img").count() == K
            page.wait_for_function(f"document.querySelectorAll('#raw-hits img').length === {K}", timeout=30_000)
            assert page.locator("#raw-hits").is_visible()
            assert "Found a car" in page.locator("#status").inner_text()
            page.wait_for_function(MAPS_READY, timeout=120_000)  # then the maps
            assert page.locator("#query-cam img").count() == 1
            page.wait_for_function(
                "document.querySelector('#attention').innerText.includes('inside the car box')", timeout=30_000
            )
            page.locator("#photo-cams").scroll_into_view_if_needed()
            page.wait_for_function(
                "[...document.querySelectorAll('#photo-cams img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            _whole_photo_is_shown(page)
            time.sleep(1)  # let the images finish painting
            artifacts = ROOT / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "demo.png"), full_page=True)
            if os.environ.get("CARSEARCH_UPDATE_DOCS") == "1":
                shutil.copy(artifacts / "demo.png", ROOT / "docs" / "demo.png")

            # every car is numbered: pick the second one in the list → that car is searched
            assert page.locator("#car input[type=radio]").count() >= 2
            first_crop, first_hits = _crop_src(page), page.locator("#hits .caption-label").all_inner_texts()
            page.locator("#car label").nth(1).click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Car 2 of')", timeout=120_000)
            # the status, crop and hits arrive in one answer but are painted one after another: wait for each
            page.wait_for_function(
                "(before) => (document.querySelector('#crop img')?.getAttribute('src') ?? before) !== before",
                arg=first_crop,
                timeout=60_000,
            )
            page.wait_for_function(
                f"(before) => {HITS_READY} && [...document.querySelectorAll('#hits .caption-label')]"
                ".map(e => e.innerText).join('|') !== before.join('|')",
                arg=first_hits,
                timeout=60_000,
            )
            assert page.locator("#car input[type=radio]").nth(1).is_checked()
            page.screenshot(path=str(artifacts / "demo-car-2.png"), full_page=True)
            page.wait_for_function(MAPS_READY, timeout=120_000)

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
        return query, client.predict(handle_file(str(query)), 3, 0.25, None, api_name="/search")

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


def test_the_json_api_on_the_same_server(demo_server: tuple[str, Path]) -> None:
    import httpx

    url, gallery = demo_server
    with (gallery / "class_0" / "img_2.jpg").open("rb") as photo:
        response = httpx.post(f"{url}api/v1/search", params={"k": 3}, files={"image": photo}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["car"] == 1 and body["hits"][0]["label"] == "class_0" and len(body["hits"]) == 3
    thumbnail = httpx.get(f"{url.rstrip('/')}{body['hits'][0]['thumbnail']}", timeout=30)
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    bad = httpx.post(f"{url}api/v1/search", files={"image": ("x.txt", b"not a photo")}, timeout=30)
    assert bad.status_code == 415 and "not an image" in bad.json()["error"]


def _click_photo_at(page, fx: float, fy: float) -> None:  # noqa: ANN001 - playwright Page
    """Click the drawn picture at the fraction (fx, fy) of its own width and height (object-fit: contain)."""
    img = page.locator("#annotated img").first
    drawn = img.evaluate(
        """(img) => { const r = img.getBoundingClientRect();
                      const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
                      const w = s * img.naturalWidth, h = s * img.naturalHeight;
                      return {w, h, dx: (r.width - w) / 2, dy: (r.height - h) / 2}; }"""
    )
    img.click(position={"x": drawn["dx"] + fx * drawn["w"], "y": drawn["dy"] + fy * drawn["h"]})


ANSWERED = """() => {
  const status = document.querySelector('#status').innerText;
  const car = status.match(/Car (\\d+) of/);
  const radios = [...document.querySelectorAll('#car input[type=radio]')];
  const toast = [...document.querySelectorAll('body *')].some(e => e.childElementCount === 0
      && e.textContent.includes('Click inside a numbered box'));
  if (toast) return 'toast';
  if (car && status !== window.__before && radios[Number(car[1]) - 1]?.checked) return 'car ' + car[1];
  return false;
}"""


def test_a_click_on_the_picture_searches_the_car_under_it(demo_server: tuple[str, Path]) -> None:
    """Clicks on the drawn picture reach the car picker: each is answered by a search of a numbered car (its
    number checked in the list) or by the 'click inside a box' notice. (Which car is under a point is unit-tested
    in tests/unit/demo/test_handlers.py: the tiny test detector's boxes tie in score, so they are not pinned.)"""
    from playwright.sync_api import sync_playwright

    url, gallery = demo_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url, wait_until="load")
            page.locator("#search").wait_for(timeout=60_000)
            _search(page, gallery / "class_1" / "img_0.jpg")
            page.wait_for_function("document.querySelector('#status').innerText.includes('Car 1 of')", timeout=120_000)
            page.wait_for_function(MAPS_READY, timeout=120_000)  # idle again: a click is answered at once
            answers = []
            for fx, fy in [(0.1, 0.1), (0.5, 0.5), (0.9, 0.9)]:
                page.evaluate("window.__before = document.querySelector('#status').innerText")
                _click_photo_at(page, fx, fy)
                answers.append(page.wait_for_function(ANSWERED, timeout=120_000).json_value())
                page.wait_for_function(MAPS_READY, timeout=120_000)
            assert any(a.startswith("car") for a in answers), answers
        finally:
            browser.close()
