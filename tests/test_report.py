"""``moecache analyze`` end to end on small traces: the report folder checked in pure Python.

The page must be self-contained (no external URL anywhere, every image an embedded PNG that is also
written beside it), every number of summary.json must be printed on the page under its key with
the same value, and every file summary.json lists must exist.
"""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from moecache.analysis.report import flatten, fmt
from moecache.cli import main
from moecache.trace import PHASE_DECODE, PHASE_PREFILL, RoutingBlock, TraceMeta, write_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic(path: Path, seed: int, n_seq: int = 4, tokens: int = 40) -> str:
    """A 4-layer, 8-expert, top-2 trace with prefill then decode in every sequence and some locality."""
    rng = np.random.default_rng(seed)
    L, E, k = 4, 8, 2
    blocks = []
    for s in range(n_seq):
        ids = np.zeros((tokens, L, k), np.int64)
        cur = rng.choice(E, k, replace=False)
        for t in range(tokens):
            if rng.random() < 0.4:  # sticky routing: a new pair now and then
                cur = rng.choice(E, k, replace=False, p=np.arange(1, E + 1) / np.arange(1, E + 1).sum())
            for l in range(L):
                ids[t, l] = (cur + l) % E
        ids[-1, -1] = -1  # one missing record
        phase = np.where(np.arange(tokens) < tokens // 2, PHASE_PREFILL, PHASE_DECODE)
        blocks.append(RoutingBlock.build(ids, seq=s, pos=np.arange(tokens), phase=phase))
    meta = TraceMeta(num_experts=E, top_k=k, moe_layers=[1, 3, 5, 7], model="synthetic", bytes_per_expert=1 << 20)
    return write_trace(path, meta, blocks)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.keyed: dict[str, str] = {}
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._open: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        for name in ("src", "href", "action", "data", "poster"):
            if name in a and a[name] is not None:
                self.urls.append(a[name])
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if "data-key" in a:
            self._open.append((a["data-key"], []))

    def handle_data(self, data):
        for _k, buf in self._open:
            buf.append(data)

    def handle_endtag(self, tag):
        if tag == "span" and self._open:
            k, buf = self._open.pop()
            assert k not in self.keyed or self.keyed[k] == "".join(buf), f"key {k} printed with two values"
            self.keyed[k] = "".join(buf)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("analyze")
    a = synthetic(d / "a", 1)
    b = synthetic(d / "b", 2, n_seq=3)
    out = d / "report"
    rc = main(["analyze", a, "-o", str(out), "--against", b, "--sim-tokens", "60", "-q"])
    assert rc == 0
    return out


def test_report_files(report):
    summary = json.loads((report / "summary.json").read_text())
    html_text = (report / "report.html").read_text()
    files = summary["traces"][0]["files"] + summary["against"]["files"]
    assert any(f.endswith(".png") for f in files) and any(f.endswith(".csv") for f in files)
    for f in files:
        p = report / f
        assert p.is_file() and p.stat().st_size > 0, f
        if f.endswith(".png"):
            assert p.read_bytes()[:8] == PNG_MAGIC
    # no temporary files left behind by the atomic writes
    assert not list(report.rglob("*.tmp"))
    assert "<script" not in html_text.lower()


def test_report_is_self_contained(report):
    html_text = (report / "report.html").read_text()
    parser = _Collect()
    parser.feed(html_text)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html_text, re.I), "external URL in the page"
    assert "@import" not in html_text and "url(" not in html_text
    for u in parser.urls:
        assert u.startswith("data:image/png;base64,") or u.startswith("#"), u
    summary = json.loads((report / "summary.json").read_text())
    pngs = [f for t in summary["traces"] for f in t["files"] if f.endswith(".png")] + summary["against"]["files"]
    assert len(parser.imgs) == len(pngs)
    on_disk = {(report / f).read_bytes() for f in pngs}
    for src in parser.imgs:
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG_MAGIC
        assert data in on_disk  # the embedded image is the file written beside the page


def test_every_summary_figure_is_shown(report):
    summary = json.loads((report / "summary.json").read_text())
    parser = _Collect()
    parser.feed((report / "report.html").read_text())
    leaves = flatten(summary)
    assert len(leaves) > 300
    missing = [k for k in leaves if k not in parser.keyed]
    assert not missing, f"{len(missing)} summary values not on the page, e.g. {missing[:5]}"
    for key, val in leaves.items():
        shown = parser.keyed[key]
        assert shown == fmt(val), (key, shown, val)
        if isinstance(val, (int, float)) and not isinstance(val, bool):  # independent of fmt: the number itself
            assert float(shown.replace(",", "")) == pytest.approx(val, abs=5e-5), key
    # every keyed element names a real summary value (no stale keys)
    assert set(parser.keyed) <= set(leaves)


def test_summary_content(report):
    s = json.loads((report / "summary.json").read_text())
    t = s["traces"][0]
    assert t["tokens"] == 160 and t["sequences"] == 4 and t["layers"] == 4 and t["experts"] == 8
    assert t["missing_slots"] == 8  # one missing (token, layer) record of 2 slots per sequence
    assert {p["phase"] for p in t["phases"]["phases"]} == {"prefill", "decode"}
    assert t["phases"]["jsd_prefill_decode_mean"] is not None
    for row in t["cache"]["layer"]["rows"]:
        assert 0 <= row["lru"] <= row["belady"] <= 1
    a = s["against"]
    assert a["base"] == t["name"]
    assert 0 <= a["jsd_mean"] <= 1
    assert any(r["predictor"] == "popularity-topk" for r in a["recall"])


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    a = synthetic(tmp_path / "a", 1)
    other = tmp_path / "other"
    meta = TraceMeta(num_experts=4, top_k=1, moe_layers=[0])
    write_trace(other, meta, [RoutingBlock.build(np.zeros((3, 1, 1), np.int64))])
    assert main(["analyze", a, "-o", str(tmp_path / "r"), "--against", str(other), "--no-simulate", "-q"]) == 2
    err = capsys.readouterr().err
    assert "same model shape" in err and "Traceback" not in err
    assert main(["analyze", str(tmp_path / "nope"), "-o", str(tmp_path / "r2"), "-q"]) == 2
    assert "no trace at" in capsys.readouterr().err
