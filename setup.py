"""Build script: the package, plus the optional extension ``moecache._C`` from ``csrc/``.

C++ sources (``csrc/*.cpp``) are always compiled when torch is importable at build time; CUDA
sources (``csrc/cuda/*.cu``) only where torch was built with CUDA and ``nvcc`` is found. Without
torch, or with ``MOECACHE_BUILD_EXT=0``, the package installs without the extension and runs on
its pure-Python paths.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _subpackages(base: str, prefix: str) -> dict[str, str]:
    """Map every folder with an __init__.py under ``base`` to a dotted package name."""
    found = {}
    for dirpath, _dirnames, filenames in os.walk(os.path.join(ROOT, base)):
        if "__init__.py" in filenames and "__pycache__" not in dirpath:
            rel = os.path.relpath(dirpath, ROOT)
            sub = os.path.relpath(dirpath, os.path.join(ROOT, base))
            name = prefix if sub == "." else prefix + "." + sub.replace(os.sep, ".")
            found[name] = rel
    return found


package_dir = {}
package_dir.update(_subpackages("moecache", "moecache"))
# The top-level folders are installed under moecache.* so that nothing with a generic name
# (``policies``, ``predictors``) lands at the top of site-packages.
package_dir.update(_subpackages("policies", "moecache.policies"))
package_dir.update(_subpackages("predictors", "moecache.predictors"))


def _extensions() -> tuple[list, dict]:
    if os.environ.get("MOECACHE_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("moecache: torch not importable at build time; building without moecache._C")
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/sim/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    nvcc = nvcc or shutil.which("nvcc")
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and bool(nvcc) \
        and os.environ.get("MOECACHE_BUILD_CUDA", "1") != "0"

    cxx_flags = ["-O3", "-std=c++17"]
    defines = [("MOECACHE_BUILD_FLAGS", '"' + " ".join(cxx_flags) + (" +cuda" if use_cuda else "") + '"')]
    if use_cuda:
        defines.append(("MOECACHE_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "moecache._C",
            cpp_sources + cuda_sources,
            define_macros=defines,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        ext = cpp_extension.CppExtension(
            "moecache._C", cpp_sources, define_macros=defines, extra_compile_args=cxx_flags
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    packages=sorted(package_dir),
    package_dir=package_dir,
    # The embedded default model ships with the package (moecache/assets/README.md).
    package_data={"moecache": ["assets/README.md", "assets/*/*.json", "assets/*/*.safetensors",
                              "cost/profiles/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
