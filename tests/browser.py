"""Headless Chromium for tests: render a local HTML file, dump its DOM, take a screenshot.

Debian's `chromium` package (scripts/setup.sh installs it as root). Where it is missing the
browser tests skip with a plain reason, unless EVO_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome")
WIDTH = 1280

# Injected into a copy of the page: once everything has loaded, each <img> records whether it
# decoded (naturalWidth x naturalHeight) and where it sits on the page, so that a DOM dump says
# which screenshot pixels belong to which plot.
PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.images) {
    const r = img.getBoundingClientRect();
    img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight);
    img.setAttribute('data-box', [r.left + scrollX, r.top + scrollY, r.width, r.height].map(Math.round).join(','));
  }
  document.body.setAttribute('data-page-height', document.documentElement.scrollHeight);
});
</script>"""


def chromium() -> str:
    """The browser's path, or skip (fail under EVO_REQUIRE_BROWSER=1) where there is none."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    reason = "no headless browser: install Debian's chromium package (sudo apt-get install chromium)"
    if os.environ.get("EVO_REQUIRE_BROWSER") == "1":
        pytest.fail(f"EVO_REQUIRE_BROWSER=1, but {reason}")
    pytest.skip(reason)


def _run(browser: str, profile: Path, height: int, *args: str) -> str:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--force-device-scale-factor=1", f"--window-size={WIDTH},{height}", f"--user-data-dir={profile}",
               "--virtual-time-budget=10000", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def probed_copy(page: Path, folder: Path) -> Path:
    """The page with PROBE added, beside nothing else: it must still render from its own bytes."""
    html = page.read_text()
    assert "</body>" in html
    copy = folder / "probed.html"
    copy.write_text(html.replace("</body>", PROBE + "</body>"))
    return copy


def dump_dom(browser: str, page: Path, profile: Path, height: int = 1000) -> str:
    return _run(browser, profile, height, "--dump-dom", page.as_uri())


def screenshot(browser: str, page: Path, profile: Path, out: Path, height: int) -> Path:
    _run(browser, profile, height, f"--screenshot={out}", page.as_uri())
    assert out.is_file(), f"chromium wrote no screenshot to {out}"
    return out
