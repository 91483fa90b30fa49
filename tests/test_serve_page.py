"""The chat page at / in headless Chromium (Debian's `chromium`, driven over the DevTools protocol with
`websockets`): it asks for the API key the server wants, streams answers equal to the API's, and carries the
conversation into the next turn (whose prompt the server mostly takes from its cache)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

pytest.importorskip("starlette")
websockets = pytest.importorskip("websockets.sync.client", reason="the page test drives Chromium with websockets")

from serve_helpers import client, running  # noqa: E402

from edgephi.benchmarks.serve_bench import stop  # noqa: E402

CHROMIUM = os.environ.get("EDGEPHI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; "
                                                         "`make setup-dev` installs it where it can)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-port=0",
         "--remote-allow-origins=*", "--window-size=1000,800"]


class Page:
    """One Chromium tab over the DevTools protocol; every wait is bounded."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    def call(self, method: str, timeout: float = 20.0, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
        raise TimeoutError(method)

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, seconds: float = 30.0):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"not true within {seconds} s: {expression}")


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "profile"
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        with websockets.connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=20) as ws:
            yield Page(ws)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgephi.export.bundle import export_bundle

    out, _ = export_bundle("default", tmp_path_factory.mktemp("page") / "default", formats=("onnx",), bits=4)
    return out


LAST_ANSWER = """(() => {
  const all = document.querySelectorAll('.msg.assistant');
  const last = all[all.length - 1];
  if (!last || last.dataset.state === 'streaming') return null;
  const text = last.firstChild && last.firstChild.nodeType === 3 ? last.firstChild.textContent : '';
  return {state: last.dataset.state, text, stats: (last.querySelector('.stats') || {}).textContent || '',
          count: all.length};
})()"""


def _send(page: Page, text: str) -> None:
    page.js(f"document.getElementById('input').value = {json.dumps(text)};"
            "document.getElementById('form').requestSubmit(); true")


def test_the_chat_page_streams_the_apis_answers(bundle, browser, tmp_path):
    page = browser
    with running(bundle, api_key="pagekey") as (url, srv):
        page.call("Page.enable")
        page.call("Page.navigate", url=url + "/")
        page.wait("document.readyState === 'complete' && document.getElementById('status').textContent !== ''")
        assert "API key" in page.js("document.getElementById('status').textContent")  # the server wants a key
        _send(page, "hi")
        first = page.wait(LAST_ANSWER)
        assert first["state"] == "error" and "API key" in first["text"]

        page.js("const k = document.getElementById('api-key'); k.value = 'pagekey';"
                "k.dispatchEvent(new Event('change')); document.getElementById('max-tokens').value = '24';"
                "document.getElementById('max-tokens').dispatchEvent(new Event('change')); true")
        assert page.wait("document.getElementById('model').textContent === 'default-model'")
        question = "Write a function that returns the sum of a list."
        _send(page, question)
        answer = page.wait(LAST_ANSWER)
        assert answer["state"] == "done" and answer["count"] == 2, answer
        api = client(url, "pagekey")
        expected = api.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                               max_tokens=24, temperature=0)
        assert answer["text"] == expected.choices[0].message.content
        assert "finish: length" in answer["stats"] and "24 tokens" in answer["stats"]

        _send(page, "Now add a docstring.")
        page.wait(f"({LAST_ANSWER}) && ({LAST_ANSWER}).count === 3")
        second = page.js(LAST_ANSWER)
        assert second["state"] == "done"
        follow = api.chat.completions.create(model="m", max_tokens=24, temperature=0, messages=[
            {"role": "user", "content": question}, {"role": "assistant", "content": answer["text"]},
            {"role": "user", "content": "Now add a docstring."}])
        assert second["text"] == follow.choices[0].message.content
        cached = int(second["stats"].split("(")[1].split(" cached")[0])
        assert cached > follow.usage.prompt_tokens // 2  # the page's second turn came mostly from the cache
        shot = page.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "page.png").write_bytes(__import__("base64").b64decode(shot))
        assert (tmp_path / "page.png").stat().st_size > 1000
