"""The built book in a real browser: every chapter renders, loads its images and
typesets its math with the MathJax it carries, and shows no error output.

Headless Chromium is driven through the Chrome DevTools protocol over a pipe
(``--remote-debugging-pipe``), so the test needs nothing beyond the standard
library and the browser. Without Chromium it skips, except in CI, where it fails.
"""

import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Headless, as root, on a closed network: no sandbox, GPU, QUIC or background
# traffic (updates, sync, first-run pages).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]
# What myst-nb and docutils render for a failed cell, a stderr stream or a
# broken directive.
ERROR_SELECTOR = ".output.traceback, .output.stderr, .output.error, .system-message"
TIMEOUT = 60.0

# Runs in the page once it has loaded: waits for every image and for MathJax,
# then describes the page.
INSPECT_PAGE = """
(async (errorSelector, timeoutMs) => {
  const deadline = Date.now() + timeoutMs;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  const images = [...document.images];
  for (const img of images) {
    img.loading = "eager";
    while (!img.complete && Date.now() < deadline) await sleep(50);
  }

  const math = [...document.querySelectorAll(".math")];
  let mathjax = "absent";
  if (math.length) {
    while (!window.MathJax?.startup?.promise && Date.now() < deadline) {
      await sleep(50);
    }
    if (window.MathJax?.startup?.promise) {
      await MathJax.startup.promise;
      mathjax = "typeset";
    }
  }

  const h1 = document.querySelector("main h1, article h1, h1");
  let heading = "";
  if (h1) {
    const copy = h1.cloneNode(true);
    copy.querySelectorAll(".headerlink").forEach((a) => a.remove());
    heading = copy.textContent.trim();
  }
  const origin = location.origin;
  return {
    status: performance.getEntriesByType("navigation")[0]?.responseStatus,
    title: document.title,
    heading: heading,
    images: images.map((img) => ({
      src: img.getAttribute("src"),
      loaded: img.complete && img.naturalWidth > 0,
    })),
    math: math.length,
    untypeset: math
      .filter((m) => !m.querySelector("mjx-container"))
      .map((m) => m.textContent.trim().slice(0, 80)),
    mathjax: mathjax,
    mathjax_scripts: [...document.scripts]
      .map((s) => s.src)
      .filter((src) => /mathjax/i.test(src)),
    errors: [...document.querySelectorAll(errorSelector)].map(
      (e) => e.className + ": " + e.textContent.trim().slice(0, 200)
    ),
    traceback: document.body.innerText.includes("Traceback"),
    external: performance
      .getEntriesByType("resource")
      .map((r) => r.name)
      .filter((name) => !name.startsWith(origin)),
  };
})
"""


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def chapters() -> list[str]:
    """Every file of _toc.yml, the root first, as a path without a suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("chapters", []) + entry.get("sections", []))

    walk(toc.get("parts", []) + toc.get("chapters", []))
    return files


class DevTools:
    """A minimal Chrome DevTools protocol client over Chromium's debugging pipe.

    Chromium reads NUL-terminated JSON messages on its descriptor 3 and writes
    them on its descriptor 4.
    """

    def __init__(self, binary: str, user_data_dir: Path):
        to_browser_read, self._write = os.pipe()
        self._read, from_browser_write = os.pipe()
        # bash moves the pipe ends to descriptors 3 and 4 before starting Chromium.
        script = f'exec "$@" 3<&{to_browser_read} 4>&{from_browser_write}'
        self.process = subprocess.Popen(
            ["bash", "-c", script, "chromium", binary, *CHROMIUM_FLAGS]
            + [f"--user-data-dir={user_data_dir}", "about:blank"],
            pass_fds=(to_browser_read, from_browser_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._events = []

    def close(self):
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._read)
        os.close(self._write)

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._read], [], [], remaining)
            if ready:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its debugging pipe")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """Calls ``method`` and returns its result; events meanwhile are kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self._events.append(reply)

    def wait_for(self, method: str, session: str) -> dict:
        """Waits for the event ``method`` of ``session``, kept or yet to come."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            for event in self._events:
                if event.get("method") == method and event.get("sessionId") == session:
                    self._events.remove(event)
                    return event
            self._events.append(self._receive(deadline))

    def open_page(self) -> str:
        """A new tab; returns its session."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)
        session = session["sessionId"]
        self.send("Page.enable", session)
        return session

    def inspect(self, session: str, url: str) -> dict:
        """Loads ``url`` in the tab and returns what INSPECT_PAGE reports."""
        self._events.clear()
        navigation = self.send("Page.navigate", session, url=url)
        if "errorText" in navigation:
            raise RuntimeError(f"{url}: {navigation['errorText']}")
        self.wait_for("Page.loadEventFired", session)
        call = f"{INSPECT_PAGE}({json.dumps(ERROR_SELECTOR)}, {TIMEOUT * 500})"
        result = self.send(
            "Runtime.evaluate",
            session,
            expression=call,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{url}: {result['exceptionDetails']}")
        return result["result"]["value"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; a skip without one, a failure in CI."""
    binary = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if binary is None:
        reason = (
            f"Chromium is not installed ({CHROMIUM}); `make chromium` installs it "
            "as root with apt-get"
        )
        if _in_ci():
            pytest.fail(f"{reason}, and CI must run the browser test")
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="session")
def served_book(built_book):
    """The built HTML on a loopback HTTP server, as its base URL."""
    handler = functools.partial(
        _QuietHandler, directory=str(built_book / "_build" / "html")
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def inspect_book(binary: str, base_url: str, pages: list[str], tmp_path: Path):
    """What the browser reports for each page, keyed by page."""
    browser = DevTools(binary, tmp_path / "chromium-profile")
    try:
        session = browser.open_page()
        return {
            page: browser.inspect(session, f"{base_url}/{page}.html") for page in pages
        }
    finally:
        browser.close()


def problems(page: str, report: dict) -> list[str]:
    """What is wrong with one page, one sentence each; empty when all is well."""
    if report["status"] != 200:
        return [f"{page}: HTTP status {report['status']}, not 200"]
    found = []
    if not report["heading"] or report["heading"] not in report["title"]:
        found.append(
            f"{page}: no title (heading {report['heading']!r}, "
            f"title {report['title']!r})"
        )
    for image in report["images"]:
        if not image["loaded"]:
            found.append(f"{page}: image {image['src']!r} did not load")
    if report["math"] and report["mathjax"] != "typeset":
        found.append(
            f"{page}: {report['math']} formulas but MathJax never started "
            f"(scripts: {report['mathjax_scripts']})"
        )
    elif report["untypeset"]:
        found.append(f"{page}: formulas left as TeX: {report['untypeset'][:3]}")
    for script in report["mathjax_scripts"]:
        if "/_static/mathjax/" not in script:
            found.append(f"{page}: MathJax from {script}, not from the book")
    for error in report["errors"]:
        found.append(f"{page}: error output {error!r}")
    if report["traceback"]:
        found.append(f"{page}: the page shows a Traceback")
    if report["external"]:
        found.append(f"{page}: requests outside the book: {report['external'][:3]}")
    return found


@pytest.mark.slow
def test_every_chapter_renders_its_images_and_math_in_a_browser(
    chromium, served_book, tmp_path
):
    pages = chapters()
    reports = inspect_book(chromium, served_book, pages, tmp_path)

    found = [p for page in pages for p in problems(page, reports[page])]
    assert not found, "the browser found:\n" + "\n".join(found)
    # Not vacuous: the book has figures and formulas, and the browser saw them.
    assert any(reports[page]["images"] for page in pages)
    assert sum(reports[page]["math"] for page in pages) > 0
