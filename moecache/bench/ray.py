"""Run a suite's configurations as Ray tasks: ``moecache bench --suite CONFIG -o DIR --ray [ADDRESS]``.

The driver (the process that runs ``moecache bench``) plans the grid, reads the journal, submits one Ray
task per configuration that the journal lacks, and alone writes the journal, the tables and the plots, as
a local run does: the outputs are byte-identical to ``--jobs N``'s, and a killed driver resumes from its
journal in the same way.

**Where it runs.** Without an address, ``ray.init()`` starts a local Ray instance on this machine (no
dashboard) and stops it at the end. With one (``--ray HOST:PORT``, or ``--ray auto`` for the cluster that
``ray start`` made on this machine), the tasks run on that cluster's nodes; the cluster keeps running.

**Traces.** Two ways to reach the workers (``--ray-traces``):

- ``path``: every task opens the trace at its path. Right where every node reads the same path (the local
  instance, or a shared file system); the default without an address.
- ``store``: the driver reads each trace folder once and puts its files into Ray's object store; a worker
  writes them into a cache folder on its node (``ray-traces/<identity>`` in ``$MOECACHE_CACHE_DIR`` or
  ``~/.cache/moecache``, written
  under a temporary name and renamed, so a killed worker never leaves a half trace) and opens that. The
  default with an address, where a node may not see the driver's paths.

**Failures.** A task whose worker or node dies is retried by Ray (``max_retries``); a configuration whose
replay raises is not retried (the replay is deterministic) and is reported: the others finish and are
journaled, then :class:`SuiteFailed` names every failed configuration, so a rerun computes only those.

**Versions.** Before any task, one probe task per alive node returns that node's moecache version and the
fingerprint of its compiled extension; a node that differs from the driver stops the run with a message
naming it. Every node needs the same install (the same wheel, or ``pip install`` of the same commit, which
builds the extension there).

**Ctrl-C** on the driver cancels the submitted tasks (running ones are killed) and leaves the journal with
every row that had finished.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from dataclasses import replace
from typing import Any, Callable

from ..errors import ConfigError, MoecacheError

#: The Ray versions this module is written and tested against (pyproject's ``ray`` extra pins the same).
RAY_MIN, RAY_BELOW = (2, 40), (3, 0)
#: How a task reaches its trace; ``auto`` is ``path`` on a local instance and ``store`` on a cluster.
TRACE_TRANSPORTS = ("auto", "path", "store")
#: Retries of a task whose worker process or node died (not of one whose replay raised).
MAX_RETRIES = 3


class SuiteFailed(MoecacheError):
    """Some configurations raised; the others are in the journal."""


def require_ray() -> Any:
    """The ``ray`` module, or a ConfigError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray, which is not installed: pip install 'moecache-offload[ray]' "
                          "(or pip install 'ray>=2.40,<3')") from None
    try:
        got = tuple(int(x) for x in ray.__version__.split(".")[:2])
    except ValueError:
        got = RAY_MIN
    if not RAY_MIN <= got < RAY_BELOW:
        raise ConfigError(f"Ray {ray.__version__} is installed; moecache needs Ray >= {RAY_MIN[0]}.{RAY_MIN[1]} and "
                          f"< {RAY_BELOW[0]}: pip install 'moecache-offload[ray]'")
    return ray


def install_fingerprint() -> dict[str, str]:
    """What must match on every node: moecache's version, and a hash of its compiled extension (``none``
    where it is not built) — a node with another build could give other rows."""
    import moecache

    from .._ext import _load

    lib, _why = _load()
    digest = "none"
    if lib is not None and getattr(lib, "__file__", None):
        h = hashlib.sha256()
        with open(lib.__file__, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()[:16]
    return {"moecache": moecache.__version__, "extension": digest}


# -- traces through the object store --------------------------------------------------------------------

def pack_trace(path: str) -> dict[str, bytes]:
    """Every regular file of a trace folder, by path relative to it."""
    files: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(path):
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    files[os.path.relpath(full, path)] = f.read()
    return files


def trace_cache_root() -> str:
    """``ray-traces`` in moecache's cache folder (``$MOECACHE_CACHE_DIR`` or ``~/.cache/moecache``) of the
    node the worker runs on."""
    base = os.environ.get("MOECACHE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "moecache")
    return os.path.join(base, "ray-traces")


def unpack_trace(files: dict[str, bytes], identity: str, root: str | None = None) -> str:
    """The folder of a trace sent through the object store, written once per node under its identity:
    into a temporary folder that is renamed into place, so a reader never sees a partial trace."""
    root = root or trace_cache_root()
    final = os.path.join(root, identity)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{identity}.", dir=root)
    try:
        for rel, data in files.items():
            target = os.path.join(tmp, rel)
            if os.path.commonpath([tmp, os.path.abspath(target)]) != tmp:
                raise MoecacheError(f"trace file {rel!r} would land outside its folder")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
        try:
            os.rename(tmp, final)
        except OSError:  # another worker of this node got there first: its copy is the same trace
            if not os.path.isdir(final):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _run_remote(run: Callable[[Any], tuple[str, dict[str, Any], float]], task: Any,
                files: Any) -> tuple[str, dict[str, Any], float]:
    """The body of a Ray task: ``run(task)``, its trace read from ``files`` when it came through the object
    store (Ray resolves the object reference before the call)."""
    if files is not None:
        task = replace(task, trace=replace(task.trace, path=unpack_trace(files, task.identity)))
    return run(task)


# -- the executor ---------------------------------------------------------------------------------------

def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ConfigError now, rather than Ray's minutes of retries, when nothing listens at ``HOST:PORT``
    (``auto`` and ``ray://`` addresses are left to Ray)."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), 'auto', or empty for a "
                          "local instance")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                          f"`ray start --head --port {port}`, or check the address") from None


def mismatched_nodes(mine: dict[str, str], found: list[tuple[str, dict[str, str]]]) -> list[str]:
    """``name: fingerprint`` of every node whose install differs from the driver's ``mine``."""
    return [f"{name}: {got}" for name, got in found if got != mine]


def _check_nodes(ray: Any) -> int:
    """Probe every alive node's install; returns the number of nodes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    mine = install_fingerprint()
    probe = ray.remote(num_cpus=0)(install_fingerprint)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    got = ray.get(refs, timeout=300)
    bad = mismatched_nodes(mine, [(n.get("NodeManagerAddress") or n["NodeID"][:8], g) for n, g in zip(nodes, got)])
    if bad:
        raise ConfigError(f"Ray node(s) with another moecache install than this driver's {mine}: {'; '.join(bad)}; "
                          "install the same moecache (same wheel or commit) on every node")
    return len(nodes)


def execute_ray(tasks: list[Any], run: Callable[[Any], tuple[str, dict[str, Any], float]],
                done: Callable[[str, dict[str, Any], float], None], *, address: str | None, traces: str = "auto",
                progress: Any = None, log: Callable[[str], None] | None = None) -> None:
    """Run ``run(task)`` for each of ``tasks`` (``moecache.bench.suite.run_task`` and its ``Task``) as Ray
    tasks and hand each result to ``done`` in the driver as it comes.

    ``address`` None starts a local instance; otherwise it is passed to ``ray.init``. ``progress`` is a
    tqdm bar (or None) whose postfix shows the tasks running and failed. Raises :class:`SuiteFailed` after
    the others have finished when some configurations raised."""
    if traces not in TRACE_TRANSPORTS:
        raise ConfigError(f"unknown --ray-traces {traces!r}; valid: {', '.join(TRACE_TRANSPORTS)}")
    ray = require_ray()
    log = log or (lambda msg: None)
    if not tasks:
        return
    started_here = not ray.is_initialized()
    if started_here and address is not None:
        check_reachable(address)
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        try:
            ray.init(**kwargs) if address is None else ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, getattr(ray.exceptions, "AuthenticationError", RuntimeError)) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = "start a local Ray instance" if address is None else f"connect to the Ray cluster at {address}"
            hint = ("; the cluster uses token authentication: set RAY_AUTH_MODE=token and make its token "
                    "available here (~/.ray/auth_token or RAY_AUTH_TOKEN)") if "auth" in str(e).lower() else \
                   ("" if address is None else "; is it running (`ray start --head` there) and is the address right?")
            raise ConfigError(f"could not {where}: {first}{hint}") from None
    try:
        nodes = _check_nodes(ray)
        mode = traces if traces != "auto" else ("path" if address is None else "store")
        log(f"ray: {nodes} node(s), {int(ray.cluster_resources().get('CPU', 0))} CPUs; traces reach the "
            f"workers by {'their paths' if mode == 'path' else 'the object store'}")
        refs: dict[str, Any] = {}
        if mode == "store":
            for t in tasks:
                if t.identity not in refs:
                    refs[t.identity] = ray.put(pack_trace(t.trace.path))
        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_run_remote)
        pending = {remote.remote(run, t, refs.get(t.identity)): t for t in tasks}
        failed: list[tuple[Any, str]] = []

        def show() -> None:
            if progress is not None:
                progress.set_postfix_str(f"in flight {len(pending)}, failed {len(failed)}", refresh=True)

        try:
            show()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        key, row, seconds = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = e.cause if getattr(e, "cause", None) is not None else e
                        last = (str(cause).strip().splitlines() or [""])[-1]
                        failed.append((task, f"{type(cause).__name__}: {last}"))
                        if progress is not None:
                            progress.update(1)
                        continue
                    done(key, row, seconds)
                show()
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if failed:
            lines = [f"{t.config.label} on {t.config.trace} ({t.config.scope}, {t.config.capacity}): {why}"
                     for t, why in failed]
            raise SuiteFailed(f"{len(failed)} configuration(s) failed; the other rows are in the journal and a "
                              "rerun computes only these: " + " | ".join(lines))
    finally:
        if started_here:
            ray.shutdown()
