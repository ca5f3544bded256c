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
    info["extension"] = extension_status()
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    ext = info.pop("extension")
    for k, v in info.items():
        print(f"{k:>16}: {v}")
    print(f"{'extension':>16}: {ext['status']}" + (" (disabled by MOECACHE_DISABLE_EXT)" if ext["disabled_by_env"] else ""))
    if ext["available"]:
        print(f"{'build flags':>16}: {ext['build_flags']}")
        print(f"{'extension cuda':>16}: {ext['with_cuda']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("doctor", help="print versions, CUDA and extension status",
                       description="Print torch, transformers, CUDA, extension status and build flags.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
