"""The chat page ``serve`` shows at ``/``: its routes, and a real headless Chromium (Debian's
``chromium`` + ``chromium-driver``) typing a prompt and watching the reply stream in.

The browser is driven over the W3C WebDriver protocol with the standard library (the same
protocol Selenium speaks): no Python package beyond the test extras. Skipped where
``chromium`` or ``chromedriver`` is not installed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, live_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

KEY = "sk-page-test"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ENTER = "\ue007"  # WebDriver's Enter key


@pytest.fixture
def app(tiny_chat_llama):  # one per test: a server's shutdown stops its engine
    import layercake
    from layercake.server.app import create_app

    llm = layercake.load(tiny_chat_llama)
    forward = llm.runner.forward

    def slow_forward(*a: Any, **kw: Any) -> Any:  # tokens far enough apart to see them arrive
        time.sleep(0.15)
        return forward(*a, **kw)

    llm.runner.forward = slow_forward
    return create_app(llm, slots=2, max_context=96, api_key=KEY, model_name="tiny-chat")


def test_page_routes(app):
    from starlette.testclient import TestClient

    c = TestClient(app)
    page = c.get("/")  # the page itself needs no key: it asks for it
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/chat.js">' in page.text
    js = c.get("/static/chat.js")
    assert js.status_code == 200 and "/v1/chat/completions" in js.text
    assert c.get("/static/chat.css").headers["content-type"].startswith("text/css")
    assert c.get("/static/index.html").status_code == 404  # only the listed files
    assert c.get("/static/..%2Fpage.py").status_code == 404
    assert c.get("/v1/info").status_code == 401  # the API keeps its key
    info = c.get("/v1/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["model"] == "tiny-chat" and info["chat_template"] and info["max_context"] == 96
    assert info["path"] == "in memory, cpu, float32; linears: mkl x13"  # runner.describe()


def test_package_ships_the_page():
    from layercake.server.page import FILES, STATIC

    assert '"server/static/*"' in (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert all((STATIC / f).is_file() for f in [*FILES, "index.html"])


class Browser:
    """A headless Chromium session through chromedriver's W3C WebDriver endpoint."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, profile: Path) -> None:
        port = free_port()
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while not self._ready():
            if time.time() > deadline or self.driver.poll() is not None:
                self.driver.kill()
                pytest.skip("chromedriver did not start")
            time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1100,720",
                f"--user-data-dir={profile}"]  # fmt: skip
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})[
            "sessionId"
        ]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/status", timeout=1) as r:
                return json.load(r)["value"]["ready"]
        except (OSError, ValueError, KeyError):
            return False

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body or {}).encode() if method == "POST" else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read().decode()[:500]}") from e

    def _session(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def element(self, css: str) -> str:
        found = self._session("POST", "/element", {"using": "css selector", "value": css})
        return found[self.ELEMENT]

    def type(self, css: str, text: str) -> None:
        self._session("POST", f"/element/{self.element(css)}/value", {"text": text})

    def clear(self, css: str) -> None:
        self._session("POST", f"/element/{self.element(css)}/clear")

    def js(self, script: str, *args: Any) -> Any:
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def text(self, css: str) -> str:
        return self.js("return document.querySelector(arguments[0]).textContent", css)

    def wait(self, script: str, timeout: float = 60) -> Any:
        deadline = time.time() + timeout
        while not (value := self.js(script)):
            assert time.time() < deadline, f"timed out waiting for: {script}"
            time.sleep(0.05)
        return value

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call("DELETE", f"/session/{self.session}")
        self.driver.terminate()
        self.driver.wait(timeout=10)


@pytest.fixture
def browser(tmp_path) -> Iterator[Browser]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


WATCH = """
window.updates = [];
new MutationObserver(() => {
  const c = document.querySelector('.msg.assistant .content');
  if (c) window.updates.push(c.textContent);
}).observe(document.getElementById('messages'), {subtree: true, childList: true,
                                                   characterData: true});
"""


def chat(browser: Browser, url: str, prompt: str, max_tokens: int, system: str = "") -> str:
    """Open the page, enter the key and settings, send ``prompt``; the reply when it ends."""
    browser.open(url)
    browser.wait("return document.getElementById('note').textContent.includes('API key')")
    browser.type("#api-key", KEY + "\t")  # the key field's change event reloads the info
    browser.wait("return document.getElementById('path').textContent !== '…'")
    browser.clear("#max-tokens")
    browser.type("#max-tokens", str(max_tokens))
    browser.clear("#temperature")
    browser.type("#temperature", "0")
    if system:
        browser.type("#system", system)
    browser.js(WATCH)
    browser.type("#prompt", prompt + ENTER)
    browser.wait("return !document.querySelector('.msg.assistant.streaming')", timeout=300)
    return browser.text(".msg.assistant .content")


def test_chat_in_a_headless_browser(app, browser, tiny_chat_llama):
    import layercake

    with live_server(app) as url:
        reply = chat(browser, url, "w3 w4 w5", max_tokens=8)
        assert browser.text("#model") == "tiny-chat"
        assert browser.text("#path") == "in memory, cpu, float32; linears: mkl x13"
        updates = browser.js("return window.updates.filter(u => u.length > 0)")
        ttft, tps = browser.text("#ttft"), browser.text("#tps")
        tokens, finish = browser.text("#tokens"), browser.text("#finish")
        assert browser.text(".msg.user .content") == "w3 w4 w5"
        assert ".msg.error" not in browser.js("return document.body.innerHTML")
    llm = layercake.load(tiny_chat_llama)
    ids = llm.chat_prompt([{"role": "user", "content": "w3 w4 w5"}])
    want = llm.generate(ids, max_new_tokens=8)[0]
    assert reply == want.text  # greedy: the page shows exactly what the model says
    assert len(set(updates)) >= 3 and updates[-1] == reply  # it grew token by token
    assert int(tokens) == len(want.token_ids) and finish == want.finish_reason
    assert ttft.endswith(" ms") and int(ttft.split()[0]) > 0
    assert tps.endswith(" tok/s") and 1 < float(tps.split()[0]) < 20  # ~0.15 s a token


def test_stop_ends_the_reply_and_frees_its_slot(app, browser):
    with live_server(app) as url:
        browser.open(url)
        browser.type("#api-key", KEY + "\t")
        browser.wait("return document.getElementById('path').textContent !== '…'")
        browser.clear("#max-tokens")
        browser.type("#max-tokens", "60")  # ~9 s at 0.15 s a token: stopped long before
        browser.type("#prompt", "w1" + ENTER)
        browser.wait("return Number(document.getElementById('tokens').textContent) >= 2")
        browser._session("POST", f"/element/{browser.element('#send')}/click")
        browser.wait("return !document.querySelector('.msg.assistant.streaming')", timeout=10)
        assert browser.text("#finish") == "stopped" and int(browser.text("#tokens")) < 30
        deadline = time.time() + 10
        while app.state.engine.engine.busy:  # the server saw the client go: the slot is free
            assert time.time() < deadline, "the stopped request still holds its slot"
            time.sleep(0.05)
        assert browser.text("#send") == "Send"


@pytest.mark.slow
def test_screenshot_on_the_embedded_model(browser, tmp_path):
    """The README's screenshot: the embedded SmolLM2-135M-Instruct answering in the page
    (``LAYERCAKE_SCREENSHOT=docs/chat-page.png pytest -m slow -k screenshot`` writes it)."""
    import layercake
    from layercake.server.app import create_app

    app = create_app(layercake.load(), slots=2, max_context=512, api_key=KEY)
    out = Path(os.environ.get("LAYERCAKE_SCREENSHOT", tmp_path / "chat-page.png"))
    with live_server(app) as url:
        reply = chat(browser, url, "What is the capital of France?", max_tokens=64,
                     system="You are a concise assistant.")  # fmt: skip
        assert "Paris" in reply
        browser.screenshot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
