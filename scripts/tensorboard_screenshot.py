"""Screenshot of a run's fitness curves in TensorBoard, for the README's "Watching a run".

    python scripts/tensorboard_screenshot.py RUN_DIR results/tensorboard_fitness.png

RUN_DIR is a search run with ``report_to=[tensorboard]``, e.g. from
``evomerge search preset=toy toy.size=tiny budget.evaluations=96 report_to=[tensorboard] run_dir=RUN_DIR``.
TensorBoard serves it on 127.0.0.1 only. Headless Chromium (``apt-get install chromium``) renders the
Scalars dashboard (its SVG charts draw without a GPU, where the Time Series dashboard's WebGL ones stay
blank), filtered to the best-so-far and per-candidate curves. It is driven over the DevTools protocol on a
pipe, not by ``--screenshot``: TensorBoard keeps "ignore outliers in chart scaling" (on by default, which
cuts the first generations off the best-so-far curve) in the page's localStorage, which only a script in
the page can turn off.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

RENDER_S = 15  # TensorBoard loads its app and data, then draws; on a busy 2-core box this takes seconds


class HeadlessChromium:
    """Chromium with ``--remote-debugging-pipe``: DevTools commands as NUL-terminated JSON on fds 3 and 4."""

    def __init__(self, binary: str, profile: str, size: tuple[int, int]) -> None:
        to_child, self._to_chrome = os.pipe()
        self._from_chrome, from_child = os.pipe()
        # Above 4, so that placing them on 3 and 4 in the child cannot overwrite one with the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
        for fd in (to_child, from_child):
            os.close(fd)

        def onto_3_and_4() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        flags += ["--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
        flags += ["--hide-scrollbars", f"--window-size={size[0]},{size[1]}", "--remote-debugging-pipe"]
        self.process = subprocess.Popen(
            [binary, *flags, "about:blank"],
            preexec_fn=onto_3_and_4,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in high:
            os.close(fd)
        self._sent, self._pending = 0, b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call(
            "Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False
        )

    def call(self, method: str, **params) -> dict:
        self._sent += 1
        message = {"id": self._sent, "method": method, "params": params}
        if hasattr(self, "session"):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._pending:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self._pending += chunk
            line, self._pending = self._pending.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self._sent:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tags", default="best/|candidate/combined", help="TensorBoard's tag filter (a regex)")
    parser.add_argument("--size", default="1100,520", help="width,height in pixels")
    args = parser.parse_args()
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    port = free_port()
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.run_dir), "--host", "127.0.0.1"]
        + ["--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/data/runs", timeout=2)  # noqa: S310 - our own local server
                break
            except OSError:
                if time.time() > deadline or board.poll() is not None:
                    sys.exit("TensorBoard did not start")
                time.sleep(1)
        page = f"{url}/?darkMode=false#scalars&tagFilter={urllib.parse.quote(args.tags, safe='')}&_smoothingWeight=0"
        with tempfile.TemporaryDirectory() as profile:
            chromium = HeadlessChromium(binary, profile, tuple(int(n) for n in args.size.split(",")))
            try:
                chromium.call("Page.navigate", url=f"{url}/#scalars")
                time.sleep(RENDER_S)
                chromium.call("Runtime.evaluate", expression="localStorage.setItem('_ignoreYOutliers', 'false')")
                chromium.call("Page.navigate", url=page)
                time.sleep(RENDER_S)
                png = chromium.call("Page.captureScreenshot", format="png")["data"]
            finally:
                chromium.close()
        args.out.write_bytes(base64.b64decode(png))
    finally:
        board.terminate()
        board.wait()
    print(f"wrote {args.out} from {page}")


if __name__ == "__main__":
    main()
