"""The analysis report opened in headless Chromium: it renders, every image decodes, nothing errors.

Two runs of Debian's ``chromium``:

1. ``--dump-dom`` on a copy of the page with a probe script inserted first in ``<head>``. The probe
   records ``window.onerror`` and every failed resource load (``error`` events, captured), and on
   ``load`` writes what it saw into the DOM: the number of images, how many decoded
   (``complete && naturalWidth > 0``) and the errors. Reading the result from the dumped DOM does not
   depend on Chromium's log format, which changes between versions; ``--virtual-time-budget`` lets
   the load event run before the dump. The shipped page itself has no script.
2. ``--screenshot`` of the page itself, checked to be a real picture (not blank).

Skipped, with the reason, only where no ``chromium`` binary is installed (``make browser`` installs
it with apt where it can).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moecache.cli import main

from .test_report import synthetic

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y "
                                                          "chromium; `make browser` does it)")

PROBE = """<script>
(function () {
  var errors = [];
  window.onerror = function (msg, src, line) { errors.push("error: " + msg + " at " + line); };
  window.addEventListener("error", function (e) {
    var t = e.target || {};
    if (t.tagName) { errors.push("failed to load " + t.tagName + " " + String(t.src || t.href).slice(0, 60)); }
  }, true);
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
    var out = document.createElement("pre");
    out.id = "moecache-probe";
    out.textContent = JSON.stringify({images: imgs.length, decoded: ok, errors: errors,
                                      width: document.body.scrollWidth, height: document.body.scrollHeight});
    document.body.appendChild(out);
  });
})();
</script>"""


def chromium(*args: str, tmp: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    a = synthetic(d / "a", 5)
    b = synthetic(d / "b", 6, n_seq=2)
    out = d / "report"
    assert main(["analyze", a, "-o", str(out), "--against", b, "--sim-tokens", "40", "-q"]) == 0
    return out / "report.html"


def test_page_loads_without_errors(page, tmp_path):
    text = page.read_text()
    probed = page.parent / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    r = chromium("--dump-dom", "--virtual-time-budget=5000", probed.as_uri(), tmp=tmp_path)
    m = re.search(r'<pre id="moecache-probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"no probe output; chromium rc={r.returncode}, stderr tail: {r.stderr[-800:]}"
    res = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    n_imgs = text.count("<img ")
    assert res["images"] == n_imgs > 0
    assert res["decoded"] == n_imgs, res
    assert res["errors"] == [], res
    assert res["height"] > 2000  # the whole report laid out, not an error page


def test_screenshot(page, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "report.png"
    r = chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri(), tmp=tmp_path)
    assert shot.is_file(), f"no screenshot; rc={r.returncode}, stderr tail: {r.stderr[-800:]}"
    assert "Uncaught" not in r.stderr  # a script error would be logged here (the page has no script)
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2000)
    stat = ImageStat.Stat(img)
    assert stat.stddev[0] > 20  # text, tables and plots: far from a blank page
    # the top of the page (title, tables) is mostly light, as the stylesheet says
    assert ImageStat.Stat(img.crop((0, 0, 1200, 300))).mean[0] > 180
