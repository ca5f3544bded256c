"""The expert format as a grid dimension of the bench suite (``formats = [...]``): rows per format with the
slots that memory holds, each format's own bound row, bf16 keys unchanged, byte-identical outputs between
--jobs values, and bad formats refused before any work."""

from __future__ import annotations

import pytest

from moecache.bench import load_config, plan_suite, run_suite
from moecache.bench.config import BF16, format_label
from moecache.errors import ConfigError

from tests.test_suite import _config, _csv, _read, _traces

FORMATS = 'formats = ["bf16", "int4", "int8:group_size=128", "int4:pool_mode=expanded"]\n'


@pytest.fixture
def workdir(tmp_path):
    _traces(tmp_path / "traces")
    return tmp_path


def _cfg(workdir, extra=FORMATS, name="suite.toml"):
    return _config(workdir, policies='["lru", "belady"]', extra=extra, name=name)


def test_formats_are_a_grid_dimension(workdir):
    plain = plan_suite(load_config(_cfg(workdir, extra="", name="plain.toml")))
    plan = plan_suite(load_config(_cfg(workdir)))
    labels = [format_label(f) for f in plan.suite.formats]
    assert labels == ["bf16", "int4 g64", "int8 g128", "int4 g64 expanded"]
    assert len(plan.runs) == 4 * len(plain.runs)
    # bf16 rows keep their keys (journals from before formats resume); the other formats have keys of their own.
    bf16 = [r for r in plan.runs if r.config.fmt == BF16]
    assert [r.key for r in bf16] == [r.key for r in plain.runs]
    assert len({r.key for r in plan.runs}) == len(plan.runs)
    # The same memory holds more compressed experts, fewer dense-plus-landing ones (capped at all experts).
    slots = {(r.config.trace, r.config.scope, r.config.capacity, format_label(r.config.fmt)): r.slots
             for r in plan.runs}
    key = ("multi", "global", "25%")
    assert slots[key + ("int4 g64",)] > slots[key + ("int8 g128",)] > slots[key + ("bf16",)] \
        > slots[key + ("int4 g64 expanded",)]
    # Every format's rows have that format's bound row.
    for r in plan.runs:
        assert plan.bound_config(r.config).fmt == r.config.fmt
        assert plan.bound_config(r.config) in {x.config for x in plan.runs}


def test_format_rows_tables_and_jobs_give_the_same_bytes(workdir):
    cfg = _cfg(workdir)
    one, two = workdir / "one", workdir / "two"
    run_suite(cfg, one, jobs=1)
    run_suite(cfg, two, jobs=2)
    assert _read(one) == _read(two)
    rows = _csv(one)
    assert {r["expert_format"] for r in rows} == {"bf16", "int4 g64", "int8 g128", "int4 g64 expanded"}
    got = {(r["trace"], r["scope"], r["capacity_label"], r["policy"], r["expert_format"]): r for r in rows}
    bf, i4 = got[("multi", "global", "25%", "lru", "bf16")], got[("multi", "global", "25%", "lru", "int4 g64")]
    assert int(i4["capacity"]) > int(bf["capacity"])
    assert float(i4["bytes_per_expert"]) < float(bf["bytes_per_expert"])
    for r in rows:  # the lower bound follows the format: never above the estimate
        assert float(r["bound_ms_per_token"]) <= float(r["est_ms_per_token"]) + 1e-9
    md = (one / "results.md").read_text()
    assert "| format |" in md and "`lru [int4 g64]`" in md  # a format column, and labels that name it
    assert "int4 g64 expanded" in md and "share of the bf16 expert memory" in md
    # A suite without formats writes what it wrote before (no format column).
    plain = workdir / "plain"
    run_suite(_cfg(workdir, extra="", name="plain.toml"), plain, jobs=1)
    assert "expert_format" not in (plain / "results.csv").read_text().splitlines()[0]
    assert "| format |" not in (plain / "results.md").read_text()


@pytest.mark.parametrize("formats, message", [
    ('["bf16", "fp8"]', "use bf16, int8 or int4"),
    ('["int4:group_size=48"]', "group_size must be one of"),
    ('["int4:pool_mode=both"]', "pool_mode must be compressed or expanded"),
    ('["int4:bits=3"]', "unknown parameter(s) ['bits']"),
    ('["bf16:group_size=64"]', "bf16 takes no parameters"),
    ('["int4", "int4:group_size=64"]', "listed more than once: int4 g64"),
])
def test_bad_formats_are_refused_before_any_work(workdir, formats, message):
    with pytest.raises(ConfigError, match="formats") as e:
        load_config(_cfg(workdir, extra=f"formats = {formats}\n"))
    assert message in str(e.value) and "\n" not in str(e.value)
