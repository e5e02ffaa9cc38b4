"""Screenshots of the built site in headless Chromium: the home page, a tutorial, an API page.

Builds the site (``mkdocs build --strict``) into a temporary folder, serves it on 127.0.0.1
under the ``/dpfl/`` sub-path of ``site_url`` (as the published site is), and saves one PNG per
page with Debian's ``chromium`` (``apt-get install chromium``), which must load every asset
from the site itself (background networking off: a CDN asset would be missing).

Usage: ``python docs/screenshots.py [--out benchmarks/results/site_screenshots]``
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "home.png": "",
    "tutorial_accounting.png": "tutorials/accounting/",
    "api_accounting.png": "api/accounting/",
}
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1280,1600",
    "--virtual-time-budget=8000",  # let MathJax and the theme's scripts finish
]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("screenshots: no chromium found; install it with `apt-get install chromium`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/site_screenshots")
    args = parser.parse_args()
    browser = _chromium()
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "dpfl"
        subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
             str(site)],
            cwd=ROOT, check=True,
        )
        handler = functools.partial(_QuietHandler, directory=tmp)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}/dpfl/"
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            for name, page in PAGES.items():
                target = args.out / name
                subprocess.run(
                    [browser, *FLAGS, f"--screenshot={target}", base + page],
                    check=True, capture_output=True, timeout=120,
                )
                print(f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: "
                      f"{base + page}")
        finally:
            server.shutdown()


if __name__ == "__main__":
    main()
