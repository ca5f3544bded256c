"""``moecache doctor``: versions, CUDA, extension status and build flags."""

from __future__ import annotations

import argparse
import json
import platform


def collect() -> dict:
    from .. import __version__
    from .._ext import extension_status

    info: dict = {"moecache": __version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["torch_threads"] = torch.get_num_threads()
    except ImportError as e:
        info["torch"] = f"missing ({e})"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError as e:
        info["transformers"] = f"missing ({e})"
    import numpy

    info["numpy"] = numpy.__version__
    info["features"] = feature_status()
    info["extension"] = extension_status()
    info["cpu_kernel"] = cpu_kernel_status()
    return info


#: Distributions the commands need (default dependencies): what each one serves.
FEATURE_PACKAGES = {"matplotlib": "analyze/bench plots", "tqdm": "progress bars", "psutil": "host memory check",
                    "fastapi": "serve", "uvicorn": "serve", "prometheus-client": "serve /metrics"}


def feature_status() -> dict:
    """The installed version of each package in ``FEATURE_PACKAGES``, or how to install a missing one."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, use in FEATURE_PACKAGES.items():
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = f"MISSING ({use}): pip install {name}"
    return out


def cpu_kernel_status() -> dict:
    """What hybrid execution's CPU expert kernel would run here: the CPU's vector features, the kernel
    chosen for them (or forced by MOECACHE_CPU_KERNEL) and the pool's default thread count."""
    import os

    from .._ext import extension
    from ..runtime.cpu_kernel import ENV_KERNEL, default_threads

    C = extension()
    requested = os.environ.get(ENV_KERNEL) or "auto"
    if C is None or not hasattr(C, "cpu_features"):
        return {"kernel": "torch (the extension is not built)", "requested": requested}
    f = C.cpu_features()
    try:
        kernel = "torch" if requested == "torch" else C.choose_cpu_kernel(requested, f["avx2"], f["fma"], f["avx512f"])
    except Exception as e:  # an unknown MOECACHE_CPU_KERNEL value: say so instead of failing the doctor
        kernel = f"invalid {ENV_KERNEL}={requested!r} ({e})"
    try:
        threads = default_threads()
    except Exception as e:
        threads = f"invalid ({e})"
    return {"kernel": kernel, "requested": requested, "features": dict(f), "threads": threads}


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    ext = info.pop("extension")
    feats = info.pop("features", None)
    cpu = info.pop("cpu_kernel", None)
    for k, v in info.items():
        print(f"{k:>16}: {v}")
    print(f"{'extension':>16}: {ext['status']}" + (" (disabled by MOECACHE_DISABLE_EXT)" if ext["disabled_by_env"] else ""))
    if ext["available"]:
        print(f"{'build flags':>16}: {ext['build_flags']}")
        print(f"{'extension cuda':>16}: {ext['with_cuda']}")
    if feats:
        print(f"{'packages':>16}: " + ", ".join(f"{k} {v}" for k, v in feats.items()))
    if cpu:
        feats = ", ".join(k for k, v in cpu.get("features", {}).items() if v) or "none"
        print(f"{'cpu kernel':>16}: {cpu['kernel']} (requested {cpu['requested']}; CPU features: {feats}; "
              f"threads {cpu.get('threads', '?')})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("doctor", help="print versions, CUDA and extension status",
                       description="Print torch, transformers, CUDA, extension status and build flags.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
