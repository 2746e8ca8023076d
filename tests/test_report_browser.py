"""The HTML report in a real browser: headless Chromium (Debian package) driven by Playwright (PyPI).

Opens the report of a tiny trained run from disk and checks every page reachable from the
index: no console errors, every image loads (naturalWidth > 0), keyboard navigation, the way
from the index to a misclassified example and back, and that it reads without JavaScript.
Skips when no browser is found, except under CI=true (CI installs Chromium), where it fails.

PROTOKNN_REPORT_RUN=RUN_DIR reports on that run instead of a tiny one, and
PROTOKNN_SCREENSHOT=PATH keeps the screenshot of a misclassified example's page there (docs/report.png was made so).
"""
import os
import shutil
from pathlib import Path
from urllib.parse import urldefrag

import pytest

from conftest import TINY, run_cli

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOW = "install one with `apt-get install chromium` and `pip install playwright` (the `test` extra)"


def _browser_or_skip():
    missing = []
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    executable = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if executable is None:
        missing.append("a Chromium browser")
    if missing:
        reason = f"no browser test: {' and '.join(missing)} not found; {HOW}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: .ci/run installs Chromium, so this must not skip)")
        pytest.skip(reason)
    return executable


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    executable = _browser_or_skip()
    root = tmp_path_factory.mktemp("report")
    run = os.environ.get("PROTOKNN_REPORT_RUN")
    if not run:
        run = root / "run"
        trained = run_cli("train", "--head", "protoknn", *TINY, "--out", run)
        assert trained.returncode == 0, trained.stderr
    result = run_cli("report", run, "--out", root / "site", "--images", "6", timeout=900)
    assert result.returncode == 0, result.stderr
    assert "report written to" in result.stdout
    return executable, root / "site"


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=site[0], args=FLAGS)
        yield chromium
        chromium.close()


def _open(page, path: Path, errors: list):
    page.goto(path.as_uri())
    missing = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                            ".map(i => i.getAttribute('src'))")
    assert missing == [], f"{path.name}: images that did not load: {missing}"
    assert page.evaluate("Array.from(document.images).every(i => i.alt.trim().length > 0)"), path.name


def test_every_page_loads_without_errors_and_every_image_shows(site, browser):
    folder = site[1]
    page = browser.new_page()
    errors = []
    page.on("console", lambda msg: errors.append(f"{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    seen, queue = set(), [folder / "index.html"]
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        _open(page, path, errors)
        for href in page.evaluate("Array.from(document.links).map(a => a.href)"):
            target, _ = urldefrag(href)
            assert target.startswith("file://"), f"{path.name} links outside the site: {href}"
            local = Path(target[len("file://"):])
            assert local.is_file(), f"{path.name} links to a missing page: {href}"
            if local.suffix == ".html" and folder in local.parents or local.parent == folder:
                queue.append(local)
    assert errors == []
    names = {p.name for p in seen}
    assert {"index.html", "prototypes.html"} <= names and sum(n.startswith("test-") for n in names) == 6
    for html in folder.glob("*.html"):
        assert "<script" not in html.read_text()  # nothing needs JavaScript


def test_index_reaches_a_misclassified_example_and_back_by_keyboard(site, browser, tmp_path):
    folder = site[1]
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.goto((folder / "index.html").as_uri())
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    wrong = page.locator("li", has_text="misclassified").first
    assert wrong.count() == 1, "the index lists no misclassified example"
    link = wrong.locator("a")
    link.focus()
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.split("/")[-1].startswith("test-")
    assert page.locator("text=misclassified").count() >= 1
    assert page.locator("h2").count() >= 1  # counterfactual sections
    shot = Path(os.environ.get("PROTOKNN_SCREENSHOT") or tmp_path / "example.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = page.get_by_role("link", name="Run overview")
    back.focus()
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.endswith("index.html")
    assert page.locator("h1").inner_text().startswith("Report:")


def test_reads_without_javascript(site, browser, tmp_path):
    folder = site[1]
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto((folder / "index.html").as_uri())
    text = page.inner_text("main")
    for words in ("Metrics", "Faithfulness of the explanations", "deletion test", "Test images"):
        assert words in text
    out = tmp_path / "index.png"
    page.screenshot(path=str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    context.close()
