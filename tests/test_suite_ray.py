"""The suite on Ray (``moecache bench --suite CONFIG -o DIR --ray``): the same tables as a local run, resume
after a killed driver, a lost node loses no configuration, failures are reported, Ctrl-C cancels.

Each test starts its own small Ray instance (2 CPUs) or cluster; the whole file takes under a minute or
two on 2 cores. Skipped where Ray is not installed (it is an optional extra)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moecache.cli import main
from moecache.errors import ConfigError
from moecache.bench import ray as suite_ray
from moecache.bench.config import load_config
from moecache.bench.plan import plan_suite
from moecache.bench.suite import Task, run_suite, run_task

from tests.test_suite import _config, _read, _traces

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MOECACHE_CACHE_DIR", str(tmp_path / "cache"))  # the object-store trace cache lands here
    _traces(tmp_path / "traces")
    return tmp_path


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local instance for the tests that do not start their own (a start takes seconds)."""
    env = {**RAY_ENV, "MOECACHE_CACHE_DIR": str(tmp_path_factory.mktemp("ray_cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield env["MOECACHE_CACHE_DIR"]
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_without_ray_the_flag_says_how_to_install(workdir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'moecache-offload\[ray\]'"):
        suite_ray.require_ray()
    cfg = _config(workdir)
    assert main(["bench", "--suite", str(cfg), "-o", str(workdir / "out"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert "moecache-offload[ray]" in err and "Traceback" not in err
    assert not (workdir / "out").exists()  # refused before the output folder is made


def test_ray_without_a_suite_is_refused(workdir, capsys):
    assert main(["bench", str(workdir / "traces" / "multi"), "--ray"]) == 2
    assert "--suite" in capsys.readouterr().err


def test_cli_on_a_local_instance_writes_the_same_tables_as_jobs_1(workdir, capsys):
    """Through the CLI: it starts and stops its own local instance."""
    cfg = _config(workdir, plots=True)
    ref = run_suite(cfg, workdir / "local", jobs=1)
    assert main(["bench", "--suite", str(cfg), "-o", str(workdir / "ray"), "--ray", "--quiet"]) == 0
    out = capsys.readouterr()
    assert f"{len(ref.rows)} configurations: {len(ref.rows)} computed now" in out.out
    assert "traces reach the workers by their paths" in out.err
    assert _read(workdir / "ray") == _read(workdir / "local")  # tables and plots, byte for byte
    meta = json.loads((workdir / "ray" / "meta.json").read_text())
    assert "--ray" in meta["command"]
    assert not ray.is_initialized()


def _tasks(cfg: Path) -> list[Task]:
    suite = load_config(cfg)
    plan = plan_suite(suite)
    spec = {t.name: t for t in suite.traces}
    return [Task(r.key, spec[r.config.trace], plan.infos[r.config.trace].identity, suite.settings, r.config, r.slots)
            for r in plan.runs]


def test_a_node_with_another_install_is_named():
    mine = {"moecache": "0.1.0", "extension": "abc"}
    found = [("10.0.0.1", dict(mine)), ("10.0.0.2", {"moecache": "0.1.0", "extension": "none"})]
    assert suite_ray.mismatched_nodes(mine, found) == ["10.0.0.2: {'moecache': '0.1.0', 'extension': 'none'}"]
    assert suite_ray.mismatched_nodes(mine, found[:1]) == []


def test_trace_files_round_trip_and_stay_inside_their_folder(workdir):
    files = suite_ray.pack_trace(str(workdir / "traces" / "multi"))
    assert "manifest.json" in files or any(name.endswith(".json") for name in files)
    where = suite_ray.unpack_trace(files, "abc", root=str(workdir / "cache"))
    assert suite_ray.pack_trace(where) == files
    assert suite_ray.unpack_trace({"x": b"other"}, "abc", root=str(workdir / "cache")) == where  # written once
    with pytest.raises(Exception, match="outside its folder"):
        suite_ray.unpack_trace({"../evil": b""}, "def", root=str(workdir / "cache"))
    assert not (workdir / "evil").exists()
    assert [p.name for p in (workdir / "cache").iterdir()] == ["abc"]  # no temporary folder left behind


def test_losing_a_node_loses_no_configuration(workdir):
    from ray.cluster_utils import Cluster

    cfg = _config(workdir)
    ref = run_suite(cfg, workdir / "local", jobs=1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        tasks = _tasks(cfg)
        got: dict[str, dict] = {}
        state = {"removed": False}

        def done(key, row, seconds):
            got[key] = row
            if not state["removed"] and len(got) >= 3:  # mid-run: tasks are queued and running on both nodes
                cluster.remove_node(worker, allow_graceful=False)
                state["removed"] = True

        suite_ray.execute_ray(tasks, run_task, done, address=cluster.address, traces="store")
        assert state["removed"]
        assert set(got) == {t.key for t in tasks}
        by_key = {r.key: row for r, row in zip(ref.plan.runs, ref.rows)}
        for key, row in got.items():
            assert {k: v for k, v in row.items() if k != "key"} == {k: v for k, v in by_key[key].items()
                                                                    if k != "key"}
    finally:
        ray.shutdown()
        cluster.shutdown()


KILLER = textwrap.dedent("""
    import os, signal, sys
    from moecache.bench import journal, suite

    after = int(sys.argv[3])
    append = journal.Journal.append
    done = []

    def dying_append(self, key, row, seconds):
        append(self, key, row, seconds)
        done.append(key)
        if len(done) == after:
            os.kill(os.getpid(), signal.SIGKILL)

    journal.Journal.append = dying_append
    suite.run_suite(sys.argv[1], sys.argv[2], ray=True)
""")


def test_killed_driver_resumes_to_the_same_output(workdir):
    cfg = _config(workdir)
    ref = run_suite(cfg, workdir / "whole", jobs=1)
    n, kill_after = len(ref.plan.runs), 9
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg), str(workdir / "resumed"), str(kill_after)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (workdir / "resumed" / "rows.jsonl").read_bytes().count(b"\n") == kill_after
    deadline = time.time() + 30  # the killed driver's local instance goes with it
    while ray.is_initialized() and time.time() < deadline:
        time.sleep(0.2)
    res = run_suite(cfg, workdir / "resumed", ray=True)
    assert (res.loaded, res.computed) == (kill_after, n - kill_after)
    assert _read(workdir / "resumed") == _read(workdir / "whole")
    lines = (workdir / "resumed" / "rows.jsonl").read_bytes().splitlines()
    assert len({json.loads(x)["key"] for x in lines}) == len(lines) == n  # nothing computed twice


# -- on one shared local instance (module-scoped: these run last, after the tests that start their own) --

def test_object_store_traces_give_the_same_rows(workdir, local_ray):
    cfg = _config(workdir)
    ref = run_suite(cfg, workdir / "local", jobs=1)
    res = run_suite(cfg, workdir / "store", ray=True, ray_traces="store")
    assert res.computed == len(ref.rows)
    assert _read(workdir / "store") == _read(workdir / "local")
    cache = Path(local_ray) / "ray-traces"  # the workers' cache folder, as the instance was started
    assert sorted(p.name for p in cache.iterdir()) == sorted(i.identity for i in ref.plan.infos.values())


def test_a_failing_configuration_is_reported_and_the_others_finish(workdir, local_ray):
    tasks = _tasks(_config(workdir))[:6]
    broken = dataclasses.replace(tasks[2], trace=dataclasses.replace(tasks[2].trace, path=str(workdir / "gone")))
    tasks[2] = broken
    got: dict[str, dict] = {}
    with pytest.raises(suite_ray.SuiteFailed, match=r"1 configuration\(s\) failed.*" + broken.config.trace):
        suite_ray.execute_ray(tasks, run_task, lambda key, row, s: got.__setitem__(key, row), address=None)
    assert set(got) == {t.key for t in tasks} - {broken.key}


def test_ctrl_c_cancels_the_submitted_tasks(workdir, local_ray, monkeypatch):
    tasks = _tasks(_config(workdir))[:8]
    cancelled = []
    monkeypatch.setattr(ray, "cancel", lambda ref, force=False: cancelled.append((ref, force)))

    def interrupted(key, row, seconds):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        suite_ray.execute_ray(tasks, run_task, interrupted, address=None)
    assert len(cancelled) >= 1 and all(force for _ref, force in cancelled)


def test_an_address_where_no_cluster_answers_is_refused_before_any_work(workdir, capsys):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(workdir)
    assert main(["bench", "--suite", str(cfg), "-o", str(workdir / "out"), "--ray", f"127.0.0.1:{port}"]) == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["bench", "--suite", str(cfg), "-o", str(workdir / "out"), "--ray", "nonsense"]) == 2
    assert "is not HOST:PORT" in capsys.readouterr().err
    assert not (workdir / "out").exists()
