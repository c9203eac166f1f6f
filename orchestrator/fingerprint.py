"""What determines a stage's result, as flat named fields, and their hash (the fingerprint).

Fields: the resolved recipe without `resources`, `logging` and `description` (parallel layout
and precision stay: they change the numerics); each input's upstream fingerprint, or the
content hash of a `{path}`/`{hf}` folder; the content hash of local data files and of the
tokenizer folder; the resolved model preset; the phi4 version. Local paths themselves are left
out so that moving data or a store keeps fingerprints; remote data URLs stay as written. Knobs
that never change a result are left out too: `data.num_workers` (loader processes read the
same samples), `train.max_skipped_steps` (how long a diverging run goes on before it fails;
raising it after a failure resumes the same attempt) and `parallel.recompute` (recomputed
activations are the same numbers: only memory and time change).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import manifest as mf
from .config import LoadedRecipe
from .config.checks import model_of
from .config.paths import is_remote

FINGERPRINT_CHARS = 16  # 64 bits: collisions are not a practical concern per stage name
_UNFINGERPRINTED = ("resources", "logging", "description", "inputs", "data", "tokenizer")
_NOT_RESULTS = {"train": {"max_skipped_steps"}, "data": {"num_workers"},
                "parallel": {"recompute"}}
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@lru_cache(maxsize=1)
def phi4_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("phi4")
    except PackageNotFoundError:
        return "unknown"


def expand(pattern: str) -> list[Path]:
    """Local files a data path names: a file, a folder, a `{000..009}` shard range or glob, or
    an indexed-dataset prefix (`web` for web.bin and web.idx)."""
    path = Path(pattern).expanduser()
    if path.exists():
        return [path]
    names = [pattern]
    while any(_BRACES.search(n) for n in names):
        grown = []
        for name in names:
            m = _BRACES.search(name)
            if m is None:
                grown.append(name)
                continue
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            grown += [name[:m.start()] + str(i).zfill(width) + name[m.end():]
                      for i in range(lo, hi + 1)]
        names = grown
    found = [Path(p) for n in names for p in sorted(glob.glob(n))]
    if not found:
        found = [Path(p) for p in sorted(glob.glob(glob.escape(pattern) + ".*"))]
    return found


def content_digest(pattern: str, hashes: mf.HashCache) -> str | None:
    """Hash of every file a local path names (folders recursively, links followed); None if
    it names none. A file that cannot be hashed (a FIFO, a device, a dangling link, no
    permission) raises mf.UnreadableFile naming it: never a hang, never a traceback."""
    files = expand(pattern)
    if not files:
        return None
    if len(files) == 1 and files[0].is_file():  # one file: its name is not its content
        return mf.digest({"": _build(files[0], hashes)[files[0].name]})
    if len(files) == 1:  # one folder: paths inside it
        return mf.digest(_build(files[0], hashes))
    # Several: each by its path relative to their common parent, so that `d/*/s.txt` keeps
    # `a/s.txt` and `b/s.txt` apart (shards in one folder keep their bare names).
    base = os.path.commonpath([os.path.abspath(f.parent) for f in files])
    manifest: mf.Manifest = {}
    for root in files:
        where = Path(os.path.relpath(os.path.abspath(root), base)).as_posix()
        for rel, entry in _build(root, hashes).items():
            manifest[f"{where}/{rel}" if root.is_dir() else where] = entry
    return mf.digest(manifest)


def _build(root: Path, hashes: mf.HashCache) -> mf.Manifest:
    try:
        return mf.build(root, hashes, follow_links=True)
    except mf.UnreadableFile as err:  # named by its full path: the user's own file
        raise mf.UnreadableFile(str(root / err.rel if root.is_dir() else root), err.why) \
            from None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 40}} -> {"train.steps": 40}; lists of mappings get [i]."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out  # an empty mapping is the same as an absent one
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def stage_fields(loaded: LoadedRecipe, inputs: dict[str, dict], hashes: mf.HashCache
                 ) -> tuple[dict[str, Any], list[tuple[tuple, str]]]:
    """The fingerprinted fields, and what is missing on disk (reasons the stage is blocked).

    `inputs` maps input name to what identifies it: for a store input its upstream
    fingerprint, for a path input its content digest (see plan.py).
    """
    recipe = loaded.recipe
    doc = recipe.model_dump(mode="json", exclude={**dict.fromkeys(_UNFINGERPRINTED, True),
                                                  "train": _NOT_RESULTS["train"],
                                                  "parallel": _NOT_RESULTS["parallel"]})
    missing: list[tuple[tuple, str]] = []  # (recipe location, what is not there)
    doc["inputs"] = inputs
    if recipe.data is not None:
        data = recipe.data.model_dump(mode="json", exclude=_NOT_RESULTS["data"])
        for i, source in enumerate(data["sources"]):
            path = source.get("path")
            if path is None or is_remote(path):
                continue
            digest, why = digest_or_problem(path, hashes)
            if digest is None:
                missing.append((("data", "sources", i, "path"), why or f"no data at {path}"))
            source.pop("path")
            source["content"] = digest
        doc["data"] = data
    if recipe.tokenizer is not None:
        doc["tokenizer"] = recipe.tokenizer
        if recipe.tokenizer != "demo":
            digest, why = digest_or_problem(recipe.tokenizer, hashes)
            if digest is None:
                missing.append((("tokenizer",),
                                why or f"no tokenizer folder at {recipe.tokenizer}"))
            doc["tokenizer"] = {"content": digest}
    model = model_of(recipe)
    if model is not None:
        doc["model_config"] = _hash(model.model_dump(mode="json"))
    doc["phi4_version"] = phi4_version()
    return flatten(doc), missing


def digest_or_problem(pattern: str, hashes: mf.HashCache) -> tuple[str | None, str | None]:
    """content_digest, or why a file it names cannot be hashed."""
    try:
        return content_digest(pattern, hashes), None
    except mf.UnreadableFile as err:
        return None, f"cannot hash {err}"


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def fingerprint(fields: dict[str, Any]) -> str:
    return _hash(fields)[:FINGERPRINT_CHARS]


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> list[str]:
    """`train.steps: 40 -> 50`, one per changed field; inputs by name and upstream."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, _UNSET) == new.get(key, _UNSET):
            continue
        m = re.fullmatch(r"inputs\.(\w+)\.(fingerprint|content)", key)
        if m and key in old and key in new:
            what = (f"{new.get(f'inputs.{m.group(1)}.stage')} fingerprint "
                    f"{_short(old[key])} -> {_short(new[key])}"
                    if m.group(2) == "fingerprint" else "its files changed")
            out.append(f"input {m.group(1)} changed ({what})")
        else:
            out.append(f"{key}: {_show(old.get(key, _UNSET))} -> {_show(new.get(key, _UNSET))}")
    if len(out) > limit:
        out = out[:limit] + [f"and {len(out) - limit} more fields"]
    return out


_UNSET = object()


def _short(value: Any) -> str:
    return str(value)[:8] if value is not None else "none"


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
