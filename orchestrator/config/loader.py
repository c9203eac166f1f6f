"""From YAML files to validated recipes and pipelines.

Layers, in order: the file and its `extends:` chain, a pipeline's per-stage overrides, the
profile (`--profile tiny`), then `--set key=value` overrides; then interpolation, local paths
made absolute (`paths.py`), then the schema, then the cross-field checks. Every value keeps the
origin it was written at. Files are read only through `files.read_bytes` (via `read_yaml`),
and within one load each file is parsed once (`_reading_once`: nine recipes extending the same
base read it once, and a pipeline is not parsed again after `load_any` looked at it); an
`extends:` chain is at most MAX_EXTENDS_DEPTH files deep and reads at most
MAX_EXTENDS_FILES files, so no chain can recurse without end or fan out exponentially.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import check_recipe
from .errors import ConfigError, Loc, Origin, Positions, Problem, did_you_mean, origin_of
from .files import file_problem
from .interpolate import resolve
from .merge import copy_document, drop_nulls, merge, set_path
from .paths import anchor_paths
from .schema import NON_TRAIN_KINDS, Pipeline, Recipe, StageEntry
from .validate import validate
from .yamlio import MAX_DEPTH, parse_value, read_yaml

if TYPE_CHECKING:
    from .cluster import LoadedCluster

MAX_EXTENDS_DEPTH = 16
MAX_EXTENDS_FILES = 64
_TRAIN_ONLY_KEYS = {"model", "tokenizer", "trainable", "frozen", "data", "train", "parallel",
                    "precision"}
RECIPE_FIELDS = set(Recipe.model_fields)
# Fields of cluster.Cluster that a recipe does not have (a test keeps this in step), so that
# `load_any` tells a cluster file without importing the cluster model for every recipe.
CLUSTER_ONLY_KEYS = frozenset({
    "partition", "account", "qos", "reservation", "time_limit", "gpus_per_node",
    "cpus_per_task", "mem_per_cpu", "container_image", "container_mounts", "setup",
    "dependency", "signal_lead_s", "requeue_release_now", "launcher", "rdzv_port", "python",
    "host_python",
})


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path
    positions: Positions = field(repr=False)
    document: dict = field(repr=False)  # resolved, before pydantic defaults

    def origin(self, loc: Loc = ()) -> Origin:
        return origin_of(self.positions, loc, Origin(str(self.path)))


@dataclass
class LoadedPipeline:
    pipeline: Pipeline
    path: Path
    stages: dict[str, LoadedRecipe]  # in file order
    positions: Positions = field(repr=False)


@dataclass(frozen=True)
class Override:
    text: str
    stage: str | None
    loc: Loc
    value: Any


# ---------------------------------------------------------------------------------------------
# reading files, once per load
# ---------------------------------------------------------------------------------------------

# Parsed files of the load in progress, by the path as given (positions name the file that way);
# None outside a load, so a later load sees files as they are then.
_READS: ContextVar[dict[str, tuple[dict, Positions]] | None] = ContextVar("phi4_reads",
                                                                          default=None)


@contextmanager
def _reading_once() -> Iterator[None]:
    """Within this block (and the loads nested in it) each file is parsed at most once."""
    if _READS.get() is not None:
        yield
        return
    token = _READS.set({})
    try:
        yield
    finally:
        _READS.reset(token)


def _read(path: Path) -> tuple[dict, Positions]:
    """`read_yaml(path)`, from the current load's cache when it was parsed already; callers
    get their own copy to change."""
    cache = _READS.get()
    if cache is None:
        return read_yaml(path)
    key = str(path)
    if key not in cache:
        cache[key] = read_yaml(path)
    doc, positions = cache[key]
    return copy_document(doc), dict(positions)


# ---------------------------------------------------------------------------------------------
# extends
# ---------------------------------------------------------------------------------------------


def read_with_extends(path: Path) -> tuple[dict, Positions]:
    """A file with its `extends:` parents merged under it (parents relative to the file)."""
    return _read_chain(path, (), [0])


def _read_chain(path: Path, chain: tuple[Path, ...], files_read: list[int]
                ) -> tuple[dict, Positions]:
    doc, positions = _read(path)
    files_read[0] += 1
    key = path.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in chain + (key,))
        raise ConfigError.single(positions.get(("extends",), Origin(str(path))), ("extends",),
                                 f"extends cycle: {cycle}")
    parents = doc.pop("extends", None)
    origin = positions.pop(("extends",), Origin(str(path)))
    if parents is None:
        return doc, positions
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError.single(Origin(str(path), 1), ("extends",),
                                 "extends must be a path or a list of paths", parents)
    if len(chain) + 1 >= MAX_EXTENDS_DEPTH:
        raise ConfigError.single(origin, ("extends",),
                                 f"extends chain deeper than {MAX_EXTENDS_DEPTH} files")
    base: dict = {}
    base_pos: Positions = {}
    for parent in parents:
        parent_path = path.parent / parent
        why = file_problem(parent_path)
        if why is not None:
            raise ConfigError.single(origin, ("extends",), f"extended file {why}",
                                     str(parent_path))
        if files_read[0] >= MAX_EXTENDS_FILES:
            raise ConfigError.single(origin, ("extends",),
                                     f"extends reads more than {MAX_EXTENDS_FILES} files")
        parent_doc, parent_pos = _read_chain(parent_path, chain + (key,), files_read)
        base, base_pos = merge(base, base_pos, parent_doc, parent_pos)
    return merge(base, base_pos, doc, positions)


# ---------------------------------------------------------------------------------------------
# overrides and profiles
# ---------------------------------------------------------------------------------------------


def parse_overrides(texts: list[str], stage_names: set[str] | None = None) -> list[Override]:
    """`key.path=value` (value typed as YAML); in a pipeline `stage.key=value` targets one stage."""
    out = []
    for text in texts:
        origin = Origin("<command line>", override=f"--set {text}")
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError.single(origin, (), "an override must look like key.path=value")
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
        if any(p == "" for p in parts):
            raise ConfigError.single(origin, (), "empty component in key path", key)
        if len(parts) > MAX_DEPTH:
            raise ConfigError.single(origin, (), f"key path deeper than {MAX_DEPTH} levels")
        value = parse_value(raw, origin, tuple(parts))
        stage = None
        if stage_names is not None and parts[0] in stage_names and len(parts) > 1:
            stage, parts = str(parts[0]), parts[1:]
        if parts[0] not in RECIPE_FIELDS:
            choices = sorted(RECIPE_FIELDS | (stage_names or set()))
            raise ConfigError.single(origin, tuple(parts), "unknown key",
                                     hint=did_you_mean(str(parts[0]), choices))
        out.append(Override(text, stage, tuple(parts), value))
    return out


def apply_overrides(doc: dict, positions: Positions, overrides: list[Override]) -> None:
    for ov in overrides:
        origin = Origin("<command line>", override=f"--set {ov.text}")
        for key in [k for k in positions if k[: len(ov.loc)] == ov.loc]:
            del positions[key]
        try:
            set_path(doc, ov.loc, ov.value)
        except KeyError as err:
            raise ConfigError.single(origin, ov.loc,
                                     f"cannot set this path: {err.args[0]}") from None
        for loc in _key_paths(ov.value, ov.loc):  # every key the value writes, for "written?"
            positions[loc] = origin


def _key_paths(value: Any, loc: Loc):
    yield loc
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _key_paths(item, loc + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _key_paths(item, loc + (i,))


def find_profile(name: str, recipe_dirs: list[Path]) -> Path:
    """`--profile NAME`: `profiles/NAME.yaml` in the folder of the recipe, or of a pipeline or
    any of its recipes (never the source checkout: an installed phi4 has none); a name with a
    `/` or a .yaml suffix is the path of the profile file itself."""
    flag = Origin("<command line>", override=f"--profile {name}")
    if name.endswith((".yaml", ".yml")) or "/" in name:
        why = file_problem(Path(name))
        if why is not None:
            raise ConfigError.single(flag, (), f"profile file {why}", name)
        return Path(name)
    folders = list(dict.fromkeys(d / "profiles" for d in recipe_dirs))
    for folder in folders:
        candidate = folder / f"{name}.yaml"
        if file_problem(candidate) is None:
            return candidate
    known = sorted({p.stem for folder in folders for p in _yaml_files(folder)})
    where = ", ".join(str(f) for f in folders)
    raise ConfigError.single(flag, (), f"profile not found in {where}", name,
                             hint=did_you_mean(name, known)
                             or (f"known: {', '.join(known)}" if known else
                                 "give the path of a profile file"))


def _yaml_files(folder: Path) -> list[Path]:
    try:
        return list(folder.glob("*.yaml"))
    except OSError:
        return []


@dataclass
class Profile:
    path: Path
    common: dict
    common_pos: Positions
    per_stage: dict[str, tuple[dict, Positions]]
    stage_origins: dict[str, Origin]

    def unknown_stages(self, stage_names: set[str]) -> list[Problem]:
        """Per-stage overlays naming no stage: neither one being loaded nor a recipe beside the
        profiles folder that wrote it (a profile may cover more stages than one pipeline has)."""
        problems = []
        for name in self.per_stage:
            if name in stage_names:  # the common case: no folder to list
                continue
            origin = self.stage_origins[name]
            recipes = Path(origin.file).resolve().parent.parent
            known = stage_names | {p.stem for p in _yaml_files(recipes)}
            if name not in known:
                problems.append(Problem(origin, ("stages", name),
                                        f"no stage named {name!r}: this overlay would never apply",
                                        hint=did_you_mean(name, known)))
        return problems

    def overlay_for(self, stage: str, kind: str) -> list[tuple[dict, Positions]]:
        common = self.common
        if kind in NON_TRAIN_KINDS:
            common = {k: v for k, v in common.items() if k not in _TRAIN_ONLY_KEYS}
        layers = [(common, self.common_pos)]
        if stage in self.per_stage:
            layers.append(self.per_stage[stage])
        return layers


def load_profile(name: str, recipe_dirs: list[Path]) -> Profile:
    path = find_profile(name, recipe_dirs)
    doc, positions = read_with_extends(path)
    stages = doc.pop("stages", {}) or {}
    if not isinstance(stages, dict):
        raise ConfigError.single(origin_of(positions, ("stages",), Origin(str(path))), ("stages",),
                                 "expected a mapping of stage name to overlay", stages)
    per_stage = {}
    for stage, overlay in stages.items():
        if overlay is not None and not isinstance(overlay, dict):
            raise ConfigError.single(origin_of(positions, ("stages", stage), Origin(str(path))),
                                     ("stages", stage), "expected a mapping (an overlay of that "
                                     "stage's recipe)", overlay)
        per_stage[stage] = (overlay or {}, _sub_positions(positions, ("stages", stage)))
    origins = {stage: origin_of(positions, ("stages", stage), Origin(str(path)))
               for stage in per_stage}
    positions = {k: v for k, v in positions.items() if k[:1] != ("stages",)}
    return Profile(path, doc, positions, per_stage, origins)


# ---------------------------------------------------------------------------------------------
# recipes and pipelines
# ---------------------------------------------------------------------------------------------


def _finish_recipe(path: Path, doc: dict, positions: Positions) -> LoadedRecipe:
    default = Origin(str(path))
    raw = drop_nulls(doc)
    doc = resolve(raw, positions, default)
    problems = anchor_paths(raw, doc, positions, default)
    if problems:
        raise ConfigError(problems)
    recipe = validate(Recipe, doc, positions, default)
    problems = check_recipe(recipe, positions, default)
    if problems:
        raise ConfigError(problems)
    return LoadedRecipe(recipe, path, positions, doc)


def build_recipe(path: Path, *, base: tuple[dict, Positions] | None = None,
                 layers: list[tuple[dict, Positions]] = (), profile: Profile | None = None,
                 overrides: list[Override] = ()) -> LoadedRecipe:
    doc, positions = base if base is not None else read_with_extends(path)
    for overlay, overlay_pos in layers:
        doc, positions = merge(doc, positions, overlay, overlay_pos)
    if profile is not None:
        name = str(doc.get("name", path.stem))
        for overlay, overlay_pos in profile.overlay_for(name, doc.get("kind", "train")):
            doc, positions = merge(doc, positions, overlay, overlay_pos)
    apply_overrides(doc, positions, list(overrides))
    return _finish_recipe(path, doc, positions)


@_reading_once()
def load_recipe(path: str | Path, profile: str | None = None,
                overrides: list[str] = ()) -> LoadedRecipe:
    """One stage, fully resolved and checked (its inputs against sibling recipes)."""
    path = Path(path)
    prof = load_profile(profile, [path.parent]) if profile else None
    loaded = build_recipe(path, profile=prof, overrides=parse_overrides(list(overrides)))
    problems = prof.unknown_stages({loaded.recipe.name}) if prof else []
    for name, inp in loaded.recipe.inputs.items():
        if inp.stage is None:
            continue
        sibling = path.parent / f"{inp.stage}.yaml"
        loc = ("inputs", name, "stage")
        if file_problem(sibling) is not None:
            known = sorted(p.stem for p in _yaml_files(path.parent))
            problems.append(Problem(loaded.origin(loc), loc,
                                    f"no stage {inp.stage!r} "
                                    f"(no {sibling.name} beside this recipe)",
                                    hint=did_you_mean(inp.stage, known)))
            continue
        upstream = build_recipe(sibling, profile=prof)
        problems += _artifact_problems(loaded, name, upstream.recipe)
    if problems:
        raise ConfigError(problems)
    return loaded


def _artifact_problems(loaded: LoadedRecipe, input_name: str, upstream: Recipe) -> list[Problem]:
    inp = loaded.recipe.inputs[input_name]
    if inp.artifact in upstream.outputs:
        return []
    loc = ("inputs", input_name, "artifact")
    return [Problem(loaded.origin(loc), loc,
                    f"stage {upstream.name!r} has no output {inp.artifact!r} "
                    f"(its outputs: {', '.join(upstream.outputs) or 'none'})",
                    hint=did_you_mean(inp.artifact or "", upstream.outputs))]


@_reading_once()
def load_pipeline(path: str | Path, profile: str | None = None,
                  overrides: list[str] = ()) -> LoadedPipeline:
    path = Path(path)
    doc, positions = read_with_extends(path)
    default = Origin(str(path))
    # Not interpolated here: overrides are resolved in the context of each stage they reach.
    pipeline = validate(Pipeline, doc, positions, default)

    entries = list(enumerate(pipeline.stages))
    # Stage names are needed to route `stage.key=value`; read them cheaply first.
    problems: list[Problem] = []
    recipe_paths: list[tuple[int, Path, StageEntry]] = []
    for i, entry in entries:
        loc: Loc = ("stages", i, "recipe")
        recipe_path = path.parent / entry.recipe
        why = file_problem(recipe_path)
        if why is not None:
            problems.append(Problem(origin_of(positions, loc, default), loc,
                                    f"recipe file {why}", str(recipe_path)))
            continue
        recipe_paths.append((i, recipe_path, entry))
    if problems:
        raise ConfigError(problems)
    recipe_dirs = [path.parent] + [recipe_path.parent for _, recipe_path, _ in recipe_paths]
    prof = load_profile(profile, recipe_dirs) if profile else None
    raw = {i: read_with_extends(recipe_path) for i, recipe_path, _ in recipe_paths}
    names = {i: str(raw[i][0].get("name", recipe_path.stem)) for i, recipe_path, _ in recipe_paths}
    parsed = parse_overrides(list(overrides), set(names.values()))

    stages: dict[str, LoadedRecipe] = {}
    for i, recipe_path, entry in recipe_paths:
        layers = [(copy_document(pipeline.overrides), _sub_positions(positions, ("overrides",))),
                  (copy_document(entry.overrides),
                   _sub_positions(positions, ("stages", i, "overrides")))]
        mine = [o for o in parsed if o.stage in (None, names[i])]
        if names[i] in _TRAIN_ONLY_KEYS | RECIPE_FIELDS:
            problems.append(Problem(origin_of(positions, ("stages", i), default), ("stages", i),
                                    f"stage name {names[i]!r} collides with a recipe field"))
        try:
            kind = raw[i][0].get("kind", "train")
            loaded = build_recipe(recipe_path, base=raw[i],
                                  layers=layers,
                                  profile=prof, overrides=_for_kind(mine, kind))
        except ConfigError as err:
            problems += err.problems
            continue
        name = loaded.recipe.name
        if name in stages:
            problems.append(Problem(origin_of(positions, ("stages", i), default), ("stages", i),
                                    f"two stages are named {name!r}"))
            continue
        stages[name] = loaded
    if prof is not None:
        problems += prof.unknown_stages(set(stages))
    if problems:
        raise ConfigError(problems)
    problems += check_pipeline_inputs(stages)
    if problems:
        raise ConfigError(problems)
    return LoadedPipeline(pipeline, path, stages, positions)


def _sub_positions(positions: Positions, prefix: Loc) -> Positions:
    return {k[len(prefix):]: v for k, v in positions.items() if k[: len(prefix)] == prefix}


def _for_kind(overrides: list[Override], kind: str) -> list[Override]:
    """Pipeline-wide overrides of training fields skip command stages."""
    if kind not in NON_TRAIN_KINDS:
        return overrides
    return [o for o in overrides if o.stage is not None or o.loc[0] not in _TRAIN_ONLY_KEYS]


def check_pipeline_inputs(stages: dict[str, LoadedRecipe]) -> list[Problem]:
    problems = []
    for loaded in stages.values():
        for name, inp in loaded.recipe.inputs.items():
            if inp.stage is None:
                continue
            loc = ("inputs", name, "stage")
            upstream = stages.get(inp.stage)
            if upstream is None:
                problems.append(Problem(loaded.origin(loc), loc,
                                        f"no stage {inp.stage!r} in this pipeline",
                                        hint=did_you_mean(inp.stage, stages)))
                continue
            problems += _artifact_problems(loaded, name, upstream.recipe)
    return problems


def is_cluster_document(doc: dict, path: Path) -> bool:
    """A cluster file: no key only a recipe has, and a key only a cluster file has or a place
    in a folder named `clusters`."""
    keys = set(doc) - {"extends"}
    if keys & (RECIPE_FIELDS - {"name", "env"}):
        return False
    return bool(keys & CLUSTER_ONLY_KEYS) or path.parent.name == "clusters"


@_reading_once()
def load_any(path: str | Path, profile: str | None = None, overrides: list[str] = (),
             clusters: bool = False) -> LoadedRecipe | LoadedPipeline | LoadedCluster:
    """A pipeline if the file has `stages:`, a cluster file if it looks like one (see
    `is_cluster_document`; refused unless `clusters`), else a recipe."""
    path = Path(path)
    doc, _ = _read(path)
    if "stages" in doc:
        return load_pipeline(path, profile, overrides)
    if is_cluster_document(doc, path):
        if clusters:
            from .cluster import load_cluster

            return load_cluster(path)
        raise ConfigError.single(Origin(str(path)), (),
                                 "this is a cluster file, not a recipe or pipeline",
                                 hint="pass it with --executor slurm --cluster "
                                      f"{path}; `phi4 validate {path}` checks it")
    return load_recipe(path, profile, overrides)
