"""Screenshot of the global asset graph (all groups) as the Dagster UI draws it.

Starts dagster-webserver for workspace.yaml on a free localhost port with a throwaway DAGSTER_HOME,
drives headless Chromium over the DevTools protocol until every asset group is on screen, saves a PNG
and stops both processes, also on failure. Needs a Chromium binary and the `websockets` package.

    /work/venv/bin/python scripts/screenshot_asset_graph.py [--out docs/asset_graph.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets

REPO = Path(__file__).resolve().parents[1]
# /asset-groups is the UI's global lineage view: every asset of every code location in one graph.
GRAPH_PATH = "/asset-groups"
GROUP_LABELS = ("dataset", "yolo10n", "yolo10s", "yolo10m", "decision")
# Asset names appear only once their groups are expanded, so these prove the full graph is drawn.
EXPECTED_LABELS = (*GROUP_LABELS, "qat_checkpoint", "comparison", "gate")
WIDTH, HEIGHT = 1800, 1100
# Without these Chromium phones home at start-up; the closed network refuses it and it stalls.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)


# The browser-side steps below lean on how Dagster 1.13's UI is built (button icons, localStorage keys,
# the Alt+E shortcut); if a Dagster upgrade breaks them, the label waits in capture() fail loudly instead of
# producing a wrong picture.
REMEMBER_VIEW_JS = """
localStorage.setItem('communityNux', '"1"');  // keeps the 'Join the Dagster community' dialog closed
for (const button of document.querySelectorAll('button')) {
  if (button.innerText.trim() === 'Hide navigation') button.click();
}
// Alt+E expands all groups (the page starts with every group collapsed in a fresh browser profile).
document.dispatchEvent(new KeyboardEvent('keydown', {code: 'KeyE', key: 'e', altKey: true, bubbles: true}));
"""
HIDE_ASSET_SIDEBAR_JS = """
for (const button of document.querySelectorAll('button')) {
  const icon = button.querySelector('[aria-label]')?.getAttribute('aria-label');
  if (icon === 'panel_show_right' && !button.innerText.trim()) button.click();
}
"""
VIEWPORT_JS = """(() => {
  const viewport = document.querySelector('[data-svg-viewport]');
  const box = viewport.getBoundingClientRect();
  const graph = viewport.querySelector('svg');
  return {top: box.top, width: box.width, graphWidth: +graph.getAttribute('width'), graphHeight: +graph.getAttribute('height')};
})()"""
# Double-clicking the graph background is the UI's zoom-to-fit.
ZOOM_TO_FIT_JS = "document.querySelector('[data-svg-viewport]').dispatchEvent(new MouseEvent('dblclick', {bubbles: true}))"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float, proc: subprocess.Popen) -> bytes:
    """Poll `url` until it answers 200; fail early if the process serving it has died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before serving {url}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


class DevTools:
    """Minimal Chrome DevTools Protocol client: one command at a time, events are ignored."""

    def __init__(self, connection):
        self._connection = connection
        self._ids = itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        message_id = next(self._ids)
        await self._connection.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self._connection.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")


async def wait_for_labels(tools: DevTools, labels: tuple[str, ...], timeout_s: float) -> None:
    missing_js = f"{json.dumps(labels)}.filter(label => !(document.body?.innerText ?? '').includes(label))"
    deadline = time.monotonic() + timeout_s
    missing = list(labels)
    while missing and time.monotonic() < deadline:
        await asyncio.sleep(1)
        missing = await tools.evaluate(missing_js)
    if missing:
        raise TimeoutError(f"asset graph did not show {missing} within {timeout_s:.0f} s")


async def capture(page_ws_url: str, graph_url: str, timeout_s: float) -> bytes:
    async with websockets.connect(page_ws_url, max_size=None) as connection:
        tools = DevTools(connection)
        await tools.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                         deviceScaleFactor=1, mobile=False)
        await tools.call("Page.navigate", url=graph_url)
        await wait_for_labels(tools, GROUP_LABELS, timeout_s)
        # The UI keeps these choices in localStorage, so a reload draws the graph with them from the start.
        await tools.evaluate(REMEMBER_VIEW_JS)
        await tools.call("Page.reload")
        await wait_for_labels(tools, EXPECTED_LABELS, timeout_s)
        await tools.evaluate(HIDE_ASSET_SIDEBAR_JS)
        # Zoom-to-fit scales the graph to the viewport's width, so make the page just tall enough for
        # that scale to show the whole graph, then zoom to fit. The graph is centred vertically, and
        # its top margin must clear the search toolbar that floats over the viewport (about 56 px).
        view = await tools.evaluate(VIEWPORT_JS)
        scale = view["width"] / view["graphWidth"]
        height = round(view["top"] + view["graphHeight"] * scale + 2 * 80)
        await tools.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=max(height, HEIGHT),
                         deviceScaleFactor=1, mobile=False)
        await asyncio.sleep(1)
        await tools.evaluate(ZOOM_TO_FIT_JS)
        await asyncio.sleep(3)  # the zoom is animated
        shot = await tools.call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])


def page_websocket_url(devtools_port: int, chromium: subprocess.Popen) -> str:
    targets = json.loads(wait_for_http(f"http://127.0.0.1:{devtools_port}/json/list", 30, chromium))
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "asset_graph.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=180, help="seconds for each wait (server, graph)")
    args = parser.parse_args()

    web_port, devtools_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as dagster_home, tempfile.TemporaryDirectory() as profile:
        env = {**os.environ, "DAGSTER_HOME": dagster_home, "YOLO_OFFLINE": "1"}
        # The webserver alone is enough to draw the graph; `dagster dev` would also start a daemon.
        webserver = subprocess.Popen(
            [sys.executable, "-m", "dagster_webserver", "-w", "workspace.yaml",
             "-h", "127.0.0.1", "-p", str(web_port)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        chromium = None
        try:
            base_url = f"http://127.0.0.1:{web_port}"
            wait_for_http(f"{base_url}/server_info", args.timeout, webserver)
            chromium = subprocess.Popen(
                [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 f"--remote-debugging-port={devtools_port}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            png = asyncio.run(capture(page_websocket_url(devtools_port, chromium), base_url + GRAPH_PATH,
                                      args.timeout))
        finally:
            if chromium is not None:
                stop(chromium)
            stop(webserver)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"wrote {args.out} ({len(png)} bytes)")


if __name__ == "__main__":
    main()
