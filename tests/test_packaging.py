"""A plain ``pip install`` gives every command's runtime needs (issue 18, item 5), and long loads show progress."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "data" / "models" / "qwen3moe-tiny-code"


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is 3.11+")
def test_used_by_commands_need_no_extra():
    default, extras = _requirements()
    # analyze's plots, the progress bars, the host check and `moecache serve` come with a plain install
    for name in ("matplotlib", "tqdm", "psutil", "fastapi", "uvicorn", "prometheus-client"):
        assert name in default, f"{name} must be a default dependency"
    # the server tests need the official client: `make test` installs the test extra
    assert {"openai", "httpx", "pytest"} <= extras["test"]
    assert "[test" in (ROOT / "Makefile").read_text()


@pytest.mark.skipif(not MODEL.is_dir(), reason="../shared/data/models/qwen3moe-tiny-code is absent")
def test_from_pretrained_progress_bar(capsys):
    import moecache

    moecache.from_pretrained(MODEL, cache_slots=8, device="cpu", progress=False).moecache.remove()
    assert "tensor" not in capsys.readouterr().err
    moecache.from_pretrained(MODEL, cache_slots=8, device="cpu", progress=True).moecache.remove()
    err = capsys.readouterr().err
    assert "load qwen3moe-tiny-code" in err and "tensor" in err


def test_import_progress_counts_bytes(tmp_path, capsys):
    from moecache.trace.importers import import_traces

    from .test_importers import qwen_lines, write_lines

    src = write_lines(tmp_path / "run.jsonl", qwen_lines(layer=3, seed=1))
    import_traces([src], tmp_path / "out", progress=False)
    assert capsys.readouterr().err == ""
    import_traces([src], tmp_path / "out2", progress=True)
    err = capsys.readouterr().err
    size = src.stat().st_size
    assert "import vllm-moe-logger" in err and f"/{size / 1024:.2f}k" in err and "B/s" in err


def test_doctor_lists_the_feature_packages(capsys):
    from moecache.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("packages:"))
    for name in ("matplotlib", "tqdm", "fastapi", "uvicorn", "prometheus-client", "psutil"):
        assert f"{name} " in line and "MISSING" not in line
    assert "{" not in out  # every entry printed as text, none as a raw dict
