"""The HTML study report of a real (tiny, fused) study, opened in headless Chromium: it loads
with no console error and no network request, every image is displayed, and a screenshot is
saved as a test artifact (``$LORALAB_TEST_ARTIFACTS``, default ``test-artifacts/``).

Chromium is Debian's ``chromium`` package (scripts/setup.sh installs it with the test extra
where apt runs as root); the test drives it through the DevTools protocol with
websocket-client, and is skipped with the reason printed where either is missing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from loralab.study.execute import run_study
from loralab.study.report import write_report
from loralab.study.spec import load_study

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def skip_reason() -> str | None:
    if CHROMIUM is None:
        return "no chromium on PATH: apt-get install -y chromium (scripts/setup.sh does it with the test extra as root)"
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "websocket-client is not installed (pip install websocket-client; it is in the test extra)"
    return None


class Page:
    """One Chromium tab over the DevTools protocol: send commands, keep every event."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((e for e in self.events if e.get("method") == method), None)
            if found:
                return found
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)


@pytest.fixture
def chromium(tmp_path):
    reason = skip_reason()
    if reason:
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--disable-background-networking", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(found.group(1)) if found else None
        assert port, "chromium did not print its DevTools address"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        page = Page(target["webSocketDebuggerUrl"])
        yield page
        page.ws.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The report of a real study: 2 x 2 tiny runs trained in one fused process."""
    tmp = tmp_path_factory.mktemp("browser")
    base = {"model": {"path": "builtin:tiny", "device": "cpu"},
            "data": {"path": "builtin:arithmetic_2ds", "limit": 16, "val_max_examples": 4, "max_seq_length": 48},
            "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, "log_every": 1},
            "eval": {"every": 1}, "output": {"save_adapter": False}}
    path = tmp / "web.yaml"
    path.write_text(yaml.safe_dump({"name": "web", "base": base, "axes": {"lora.r": [2, 4], "lora.alpha": [4, 8]}}))
    root = tmp / "runs" / "web"
    result = run_study(load_study(path, root=root), root=root, fuse=True)
    assert result["counts"] == {"completed": 4}
    return Path(write_report(root / "study.db", "web", root / "report")["html"])


@pytest.mark.slow
def test_report_in_headless_chromium(chromium, report):
    page = chromium
    for domain in ("Page", "Runtime", "Log", "Network"):
        page.send(f"{domain}.enable")
    url = report.resolve().as_uri()
    page.send("Page.navigate", url=url)
    page.wait_for("Page.loadEventFired")
    images = page.send("Runtime.evaluate", returnByValue=True, awaitPromise=True, expression="""
        Promise.all(Array.from(document.images).map(i => i.decode().then(() => true, () => false)))
          .then(ok => Array.from(document.images).map((i, k) => ({alt: i.alt, ok: ok[k], w: i.naturalWidth,
                                                                  h: i.naturalHeight,
                                                                  shown: i.getBoundingClientRect().width})))
    """)["result"]["value"]
    shot = page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    artifacts = Path(os.environ.get("LORALAB_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    png = base64.b64decode(shot["data"])
    (artifacts / "study-report.png").write_bytes(png)
    print(f"screenshot: {artifacts / 'study-report.png'}")

    errors = [e for e in page.events if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in page.events if e["method"] == "Network.requestWillBeSent"]
    assert [u for u in requests if u != url and not u.startswith("data:")] == []
    assert len(images) >= 3  # curves, heatmap (two numeric axes), pareto
    assert all(i["ok"] and i["w"] > 0 and i["h"] > 0 and i["shown"] > 0 for i in images), images
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    title = page.send("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
    assert title == "Study report: web"
