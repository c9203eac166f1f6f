"""megatron-core's C++ dataset helpers (`helpers_cpp`): use the prebuilt one, else compile it.

What was found (megatron-core 0.16.1 from PyPI, Python 3.11): the wheel ships a prebuilt
`helpers_cpp` extension, so nothing needs compiling. megatron offers no pure-Python fallback:
`megatron.core.datasets.helpers` imports `helpers_cpp` unconditionally, and GPTDataset and
BlendedDataset need its `build_sample_idx` / `build_blending_indices`. Its own
`compile_helpers()` runs `make` in the package folder, but the wheel ships no Makefile (and it
calls `sys.exit(1)` on failure), so it cannot be used. For installs without the prebuilt
extension (source checkouts, other platforms) this module compiles the shipped `helpers.cpp`
with g++ and pybind11 once per (source hash, Python ABI) into a cache folder, under a file
lock so that concurrent ranks compile it once, and registers it under megatron's module name.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger("phi4core.data")

MODULE = "megatron.core.datasets.helpers_cpp"


def default_cache_dir() -> Path:
    root = os.environ.get("PHI4_CACHE_DIR") or Path.home() / ".cache" / "phi4"
    return Path(root) / "megatron_helpers"


def ensure_dataset_helpers(cache_dir: str | os.PathLike | None = None) -> str:
    """Make `megatron.core.datasets.helpers` importable; returns "prebuilt" or the compiled path."""
    if MODULE in sys.modules:
        return "prebuilt" if not getattr(sys.modules[MODULE], "_phi4_compiled", False) else \
            sys.modules[MODULE].__file__
    try:
        importlib.import_module(MODULE)
        return "prebuilt"
    except ImportError as e:
        log.info("megatron has no prebuilt dataset helpers (%s); compiling them", e)
    path = compile_dataset_helpers(cache_dir)
    load_helpers_from(path, MODULE)
    return str(path)


def compile_dataset_helpers(cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile megatron's `helpers.cpp` (once; cached by source hash and Python ABI)."""
    import megatron.core.datasets as mcd

    source = Path(mcd.__file__).with_name("helpers.cpp")
    if not source.is_file():
        raise RuntimeError(f"megatron-core ships no {source.name} to compile ({source})")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    folder = Path(cache_dir or default_cache_dir()) / f"{digest}{suffix.rsplit('.', 1)[0]}"
    target = folder / f"helpers_cpp{suffix}"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks wait here, then find the target
        if target.is_file():
            return target
        command = _compile_command(source, folder / f".{target.name}.{os.getpid()}.tmp")
        log.info("compiling megatron dataset helpers: %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {source} failed:\n{done.stderr[-4000:]}")
        os.replace(command[-1], target)
    return target


def _compile_command(source: Path, output: Path) -> list[str]:
    compiler = shutil.which("g++") or shutil.which("c++")
    python_include = sysconfig.get_paths()["include"]
    try:
        import pybind11
    except ImportError:
        pybind11 = None
    missing = []
    if compiler is None:
        missing.append("a C++ compiler (apt-get install g++)")
    if pybind11 is None:
        missing.append("pybind11 (pip install pybind11)")
    if not Path(python_include, "Python.h").is_file():
        missing.append(f"Python headers in {python_include} (apt-get install python3-dev)")
    if missing:
        raise RuntimeError("megatron's dataset helpers are not prebuilt and cannot be compiled: "
                           "missing " + ", ".join(missing))
    return [compiler, "-O3", "-shared", "-std=c++17", "-fPIC",
            f"-I{python_include}", f"-I{pybind11.get_include()}", str(source), "-o", str(output)]


def load_helpers_from(path: str | os.PathLike, name: str = MODULE):
    """Import a compiled helpers extension under `name` (its last part must be `helpers_cpp`)."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._phi4_compiled = True
    sys.modules[name] = module
    return module
