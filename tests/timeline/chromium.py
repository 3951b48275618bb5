"""Headless Chromium for the report tests: a page's DOM after its scripts ran, and the
summary the page wrote of what it drew (``<pre id="aura-report-check">``)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

__all__ = ["page_check", "render_dom"]

_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--virtual-time-budget=5000",  # the page's late scripts land in the dumped DOM
)  # fmt: skip


def render_dom(page: Path) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's)")
    done = subprocess.run(
        [binary, *_FLAGS, "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def page_check(page: Path) -> dict[str, Any]:
    """What the page says it drew: charts, inked canvases, points, windows, errors."""
    dom = render_dom(page)
    found = re.search(r'<pre id="aura-report-check">(.*?)</pre>', dom, re.DOTALL)
    assert found is not None, dom[-2000:]
    assert found.group(1), dom[-2000:]
    check: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return check
