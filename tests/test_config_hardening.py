"""Hostile values caught before anything queues: numbers, names, paths and files that are not
recipes. Each exits 2 with one line per problem at file:line (or the flag), never a traceback.

Cases marked `# <-` must be reported at that line, as in test_config_errors.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_config_errors import REPO, recipe

from orchestrator.cli import cli
from orchestrator.config import ConfigError, load_recipe
from orchestrator.executors.sbatch import directive_value

TRAIN = ("train:\n  steps: 10\n  seq_length: 64\n  global_batch_size: 4\n  micro_batch_size: 2\n"
         "  lr: 1.0e-3\n")


def train(**fields: str) -> str:
    """VALID's train block with fields replaced or added (marked lines allowed)."""
    lines = TRAIN.splitlines()[1:]
    keys = {line.split(":")[0].strip(): i for i, line in enumerate(lines)}
    for key, value in fields.items():
        text = f"  {key}: {value}"
        if key in keys:
            lines[keys[key]] = text
        else:
            lines.append(text)
    return "train:\n" + "\n".join(line for line in lines if not line.endswith(": ~drop")) + "\n"


@dataclass
class Case:
    id: str
    files: dict[str, str]
    expect: str
    target: str = "stage_a.yaml"
    args: list[str] = field(default_factory=list)
    where: str | None = None


NUMBER_CASES = [
    Case("lr_nan", {"stage_a.yaml": recipe(train=train(lr=".nan  # <-"))}, "finite number"),
    Case("lr_inf", {"stage_a.yaml": recipe(train=train(lr="-.inf  # <-"))}, "finite number"),
    Case("lr_negative", {"stage_a.yaml": recipe(train=train(lr="-1.0e-3  # <-"))},
         "greater than 0"),
    Case("tokens_overflow", {"stage_a.yaml": recipe(train=train(steps="~drop",
                                                                tokens="1.0e400  # <-"))},
         "finite number"),
    Case("tokens_overflow_plain", {"stage_a.yaml": recipe(train=train(steps="~drop",
                                                                      tokens="1e400  # <-"))},
         "finite number"),
    Case("tokens_absurd", {"stage_a.yaml": recipe(train=train(steps="~drop",
                                                              tokens="1.0e300  # <-"))},
         "optimizer steps"),
    Case("steps_beyond_64_bits", {"stage_a.yaml": recipe(train=train(steps="1" + "0" * 25
                                                                     + "  # <-"))},
         "must fit in 64 bits"),
    Case("warmup_beyond_budget",
         {"stage_a.yaml": recipe(train=train(steps="~drop", tokens="1024",
                                             warmup_steps="5  # <-"))},
         "must be below steps (4, from the token budget)"),
    Case("law_overflows",
         {"stage_a.yaml": recipe(train=train(steps="~drop", tokens="1.0e9",
                                             lr="{scaling_law: {B: 1.0, exponent: 1000}}  # <-"))},
         "is not a finite number"),
    Case("law_underflows",
         {"stage_a.yaml": recipe(train=train(steps="~drop", tokens="1.0e9",
                                             lr="{scaling_law: {B: 1.0, exponent: -1000}}  # <-"))},
         "is zero"),
    Case("law_b_inf",
         {"stage_a.yaml": recipe(train=train(lr="{scaling_law: {B: .inf}}  # <-"))},
         "train.lr.scaling_law.B: Input should be a finite number"),
    Case("seed_beyond_64_bits", {"stage_a.yaml": recipe(train=train(seed=f"{2**64}  # <-"))},
         "less than or equal to 4294967295"),
    Case("seed_negative", {"stage_a.yaml": recipe(train=train(seed="-1  # <-"))},
         "greater than or equal to 0"),
    Case("beta_one", {"stage_a.yaml": recipe(train=train(betas="[0.9, 1.0]  # <-"))},
         "train.betas[1]: Input should be less than 1"),
    Case("beta_negative", {"stage_a.yaml": recipe(train=train(betas="[-0.1, 0.9]  # <-"))},
         "train.betas[0]: Input should be greater than or equal to 0"),
    Case("beta_nan", {"stage_a.yaml": recipe(train=train(betas="[.nan, 0.9]  # <-"))},
         "finite number"),
    Case("eps_negative", {"stage_a.yaml": recipe(train=train(eps="-1.0e-8  # <-"))},
         "train.eps: Input should be greater than 0"),
    Case("weight_decay_inf", {"stage_a.yaml": recipe(train=train(weight_decay=".inf  # <-"))},
         "train.weight_decay: Input should be a finite number"),
    Case("grad_clip_nan", {"stage_a.yaml": recipe(train=train(grad_clip=".nan  # <-"))},
         "finite number"),
    Case("data_weight_inf",
         {"stage_a.yaml": recipe(data="data:\n  sources:\n    - {kind: synthetic, "
                                      "modality: text, weight: .inf}  # <-")},
         "data.sources[0].weight: Input should be a finite number"),
    Case("samples_beyond_64_bits",
         {"stage_a.yaml": recipe(data="data:\n  sources:\n    - {kind: synthetic, modality: text,"
                                      f" samples: {2**70}}}  # <-")},
         "must fit in 64 bits"),
    Case("pp_layers_beyond_64_bits",
         {"stage_a.yaml": recipe(parallel=f"parallel:\n  pp_layers: [{2**64}]  # <-")},
         "must fit in 64 bits"),
    Case("set_nan", {"stage_a.yaml": recipe()}, "train.lr: Input should be a finite number",
         args=["--set", "train.lr=.nan"], where="--set train.lr=.nan"),
]

NAME_CASES = [
    Case("name_newline", {"stage_a.yaml": recipe(name='name: "stage_a\\n"  # <-')},
         "must be an identifier"),
    Case("name_too_long", {"stage_a.yaml": recipe(name=f"name: {'s' * 300}  # <-")},
         "a stage name must be at most 64 characters"),
    Case("output_newline", {"stage_a.yaml": recipe(outputs='outputs: ["model\\n"]  # <-')},
         "must be an identifier"),
    Case("pipeline_name_newline",
         {"p.yaml": 'name: "p\\n"  # <-\nstages: [stage_a.yaml]\n', "stage_a.yaml": recipe()},
         "a pipeline name must be an identifier", target="p.yaml"),
    Case("input_stage_traversal",
         {"stage_a.yaml": recipe(name="name: stage_a\ninputs:\n"
                                      "  up: {stage: ../other/up, artifact: model}  # <-")},
         "inputs.up.stage: a stage name must be an identifier"),
    Case("input_artifact_newline",
         {"stage_a.yaml": recipe(name="name: stage_a\ninputs:\n"
                                      '  up: {stage: stage_b, artifact: "model\\n"}  # <-')},
         "inputs.up.artifact: an artifact name must be an identifier"),
    Case("input_empty_path",
         {"stage_a.yaml": recipe(name='name: stage_a\ninputs:\n  up: {path: ""}  # <-')},
         "inputs.up.path: empty path"),
    Case("input_path_from_empty_env",
         {"stage_a.yaml": recipe(name="name: stage_a\ninputs:\n  up: "
                                      "{path: '${oc.env:PHI4_TEST_SURELY_UNSET,\"\"}'}  # <-")},
         "inputs.up.path: empty path"),
    Case("data_empty_path",
         {"stage_a.yaml": recipe(data='data:\n  sources:\n    - {kind: indexed, path: ""}  # <-')},
         "data.sources[0].path: empty path"),
    Case("path_too_long",
         {"stage_a.yaml": recipe(name="name: stage_a\ninputs:\n"
                                      f"  up: {{path: /{'x' * 5000}}}  # <-")},
         "not a usable path"),
    Case("shard_range_absurd",
         {"stage_a.yaml": recipe(data="data:\n  sources:\n    - {kind: webdataset, "
                                      "path: 'x/{0..99999999999}.tar'}  # <-")},
         "shard ranges name more than 1000000 files"),
    Case("shard_range_digits",
         {"stage_a.yaml": recipe(data="data:\n  sources:\n    - {kind: webdataset, "
                                      f"path: 'x/{{0..{'9' * 200}}}.tar'}}  # <-")},
         "shard ranges name more than"),
    Case("inputs_differ_in_case",
         {"stage_a.yaml": recipe(name="name: stage_a\ninputs:  # <-\n  up: {path: /a}\n"
                                      "  UP: {path: /b}")},
         "differ only in case"),
    Case("env_overrides_phi4",
         {"stage_a.yaml": recipe() + "env:  # <-\n  PHI4_OUTPUT_DIR: /tmp/elsewhere\n"},
         "PHI4_OUTPUT_DIR is reserved"),
    Case("env_name_newline", {"stage_a.yaml": recipe() + 'env:  # <-\n  "A\\n": x\n'},
         "is not valid"),
    Case("cluster_name_newline", {"clusters/c.yaml": 'name: "c\\n"  # <-\npartition: debug\n'},
         "a cluster name must be an identifier", target="clusters/c.yaml"),
    Case("cluster_partition_newline",
         {"clusters/c.yaml": 'name: c\npartition: "debug\\n"  # <-\n'}, "must be a Slurm name",
         target="clusters/c.yaml"),
    Case("cluster_time_newline",
         {"clusters/c.yaml": 'name: c\ntime_limit: "01:00:00\\n"  # <-\n'},
         "time must look like", target="clusters/c.yaml"),
    Case("cluster_env_phi4", {"clusters/c.yaml": "name: c\nenv:  # <-\n  PHI4_STAGE_DIR: /x\n"},
         "PHI4_STAGE_DIR is reserved", target="clusters/c.yaml"),
]

LONG = "x" * 5000
FILE_CASES = [
    Case("yaml_nested_600", {"stage_a.yaml": "a: " + "[" * 600 + "]" * 600 + "  # <-\n"},
         "nested deeper than 32 levels"),
    Case("set_value_nested_700", {"stage_a.yaml": recipe()}, "nested deeper than 32 levels",
         args=["--set", "train.lr=" + "[" * 700 + "]" * 700], where="--set train.lr=[[["),
    Case("set_key_path_700", {"stage_a.yaml": recipe()}, "key path deeper than 32 levels",
         args=["--set", "train" + ".a" * 700 + "=1"], where="--set train.a.a"),
    Case("extends_chain_1000",
         {"stage_a.yaml": "extends: e1.yaml\n" + recipe(),
          **{f"e{i}.yaml": f"extends: e{i + 1}.yaml\n" for i in range(1, 1000)},
          "e15.yaml": "extends: e16.yaml  # <-\n"},
         "extends chain deeper than 16 files"),
    Case("extends_fan_out",
         {"stage_a.yaml": "extends: [f0.yaml, f0.yaml]\n" + recipe(),
          **{f"f{i}.yaml": f"extends: [f{i + 1}.yaml, f{i + 1}.yaml]\n" for i in range(12)},
          "f12.yaml": "x: 1\n"},
         "extends reads more than 64 files", where=".yaml:1: extends: "),
    Case("long_path", {}, "cannot be read: File name too long", target=LONG + ".yaml",
         where="xxx..."),
    Case("long_extends", {"stage_a.yaml": f"extends: {LONG}.yaml  # <-\n" + recipe()},
         "extended file cannot be read: File name too long"),
    Case("long_pipeline_recipe", {"p.yaml": f"name: p\nstages:\n  - {LONG}.yaml  # <-\n"},
         "recipe file cannot be read: File name too long", target="p.yaml"),
    Case("long_profile", {"stage_a.yaml": recipe()}, "profile file cannot be read",
         args=["--profile", LONG + ".yaml"], where="--profile xxx"),
    Case("directory", {"d/stage_a.yaml": recipe()}, "is a directory", target="d", where="d: "),
    Case("huge_file", {"stage_a.yaml": "# " + "x" * (5 * 1024 * 1024) + "\n"},
         "larger than 4 MiB", where="stage_a.yaml: "),
    Case("fifo_extends", {"stage_a.yaml": "extends: fifo.yaml  # <-\n" + recipe()},
         "extended file is a FIFO"),
    # A YAML date beside interpolations: the schema's error, not OmegaConf's traceback.
    Case("date_beside_env_interpolation",
         {"stage_a.yaml": recipe(description="description: 2024-01-02  # <-",
                                 tokenizer="tokenizer: ${oc.env:PHI4_TEST_SURELY_UNSET,/t}")},
         "Input should be a valid string"),
    Case("date_beside_interpolation",
         {"stage_a.yaml": recipe(description="description: 2024-01-02  # <-",
                                 tokenizer="tokenizer: /t/${train.seq_length}")},
         "Input should be a valid string"),
]


def _marked(files: dict[str, str]) -> str:
    for name, text in files.items():
        for number, line in enumerate(text.splitlines(), start=1):
            if line.rstrip().endswith("# <-"):
                return f"{name}:{number}: "
    raise AssertionError("case has no '# <-' marker")


def _check(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, content in case.files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    if case.id == "fifo_extends":
        os.mkfifo(tmp_path / "fifo.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PHI4_TEST_SURELY_UNSET", raising=False)
    result = CliRunner().invoke(cli, ["validate", case.target, *case.args])
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output and isinstance(result.exception, (SystemExit, type(None)))
    assert case.expect in output, output
    where = case.where if case.where is not None else _marked(case.files)
    assert where in output, f"expected {where!r} in:\n{output}"
    return output


@pytest.mark.parametrize("case", NUMBER_CASES, ids=[c.id for c in NUMBER_CASES])
def test_non_finite_and_absurd_numbers(case: Case, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _check(case, tmp_path, monkeypatch)


@pytest.mark.parametrize("case", NAME_CASES, ids=[c.id for c in NAME_CASES])
def test_names_and_paths(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _check(case, tmp_path, monkeypatch)


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.id for c in FILE_CASES])
def test_files_that_are_not_recipes(case: Case, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    output = _check(case, tmp_path, monkeypatch)
    assert len(output.strip().splitlines()) == 1, output


# ---------------------------------------------------------------------------------------------
# through the real command: no hang, no unbounded read, no traceback
# ---------------------------------------------------------------------------------------------


def _phi4(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("kind", ["device", "fifo", "symlink_to_device"])
def test_special_files_are_refused_at_once(kind: str, tmp_path: Path) -> None:
    target = {"device": Path("/dev/zero"), "fifo": tmp_path / "f.yaml",
              "symlink_to_device": tmp_path / "s.yaml"}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    if kind == "symlink_to_device":
        target.symlink_to("/dev/zero")
    for command in (["validate", str(target)], ["lr", "fit", str(target)],
                    ["show", str(target)], ["plan", str(target), "--store", str(tmp_path)]):
        proc = _phi4(*command)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "not a regular file" in proc.stderr, proc.stderr


def test_a_cluster_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "stage_a.yaml").write_text(recipe())
    os.mkfifo(tmp_path / "c.yaml")
    proc = _phi4("run", str(tmp_path / "stage_a.yaml"), "--store", str(tmp_path / "store"),
                 "--executor", "slurm", "--cluster", str(tmp_path / "c.yaml"), "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{tmp_path / 'c.yaml'}: (top level): is a FIFO" in proc.stderr


def test_symlink_to_a_recipe_still_reads(tmp_path: Path) -> None:
    (tmp_path / "real.yaml").write_text(recipe())
    (tmp_path / "stage_a.yaml").symlink_to(tmp_path / "real.yaml")
    assert _phi4("validate", str(tmp_path / "stage_a.yaml")).returncode == 0


def test_show_of_an_overflowing_law_is_an_error_not_a_crash(tmp_path: Path) -> None:
    bad = tmp_path / "stage_a.yaml"
    bad.write_text(recipe(train=train(steps="~drop", tokens="1.0e9",
                                      lr="{scaling_law: {B: 1.0, exponent: 1000}}")))
    proc = _phi4("show", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and f"{bad}:" in proc.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_grace_must_be_a_finite_number(value: str, tmp_path: Path) -> None:
    (tmp_path / "stage_a.yaml").write_text(recipe())
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "stage_a.yaml"), "--grace", value,
                                      "--store", str(tmp_path / "store")])
    assert result.exit_code == 2, result.output
    assert "--grace" in result.output and not (tmp_path / "store").exists()


def test_sbatch_directives_refuse_a_trailing_newline() -> None:
    with pytest.raises(ValueError):
        directive_value("job\n")
    assert directive_value("job") == "job"


# ---------------------------------------------------------------------------------------------
# relative paths: against the file that names them, recorded absolute
# ---------------------------------------------------------------------------------------------


def _with_input(path_text: str) -> str:
    return recipe(name=f"name: stage_a\ninputs:\n  up: {{path: {path_text!r}}}")


def test_relative_paths_resolve_against_the_file_that_names_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "project" / "recipes"
    (home / "_base").mkdir(parents=True)
    (home / "_base" / "common.yaml").write_text(
        "data:\n  sources: [{kind: indexed, path: shards/web}]\n")
    (home / "stage_a.yaml").write_text(
        "extends: _base/common.yaml\n"
        + recipe(name="name: stage_a\ninputs:\n  up: {path: ../weights}", data=""))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PHI4_TEST_REL", "from_env")
    loaded = load_recipe(Path("../project/recipes/stage_a.yaml"))
    assert loaded.recipe.inputs["up"].path == str(home / "../weights")
    assert loaded.recipe.data is not None
    assert loaded.recipe.data.sources[0].path == str(home / "_base" / "shards/web")
    # A --set value and a value that starts with an environment variable: the working folder.
    loaded = load_recipe(Path("../project/recipes/stage_a.yaml"), overrides=[
        "inputs.up.path=w", "data.sources.0.path=${oc.env:PHI4_TEST_REL}/web"])
    assert loaded.recipe.inputs["up"].path == str(elsewhere / "w")
    assert loaded.recipe.data is not None
    assert loaded.recipe.data.sources[0].path == str(elsewhere / "from_env/web")


def test_plan_finds_relative_data_from_any_folder_and_records_it_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(b"w")
    (tmp_path / "stage_a.yaml").write_text(_with_input("weights"))
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "stage_a.yaml"), "--store",
                                      str(tmp_path / "store"), "--format", "json"])
    assert result.exit_code == 0, result.output
    stage = json.loads(result.output)["stages"][0]
    assert stage["verdict"] == "run"
    assert stage["inputs"]["up"]["path"] == str(tmp_path / "weights")
    assert stage["env"]["PHI4_INPUT_UP"] == str(tmp_path / "weights")


# ---------------------------------------------------------------------------------------------
# command stages: no GPU by default; defaults named in errors
# ---------------------------------------------------------------------------------------------

BATCH_16 = train(global_batch_size="16")  # divisible by 2 x 8 data-parallel ranks
COMMAND = "name: prep\nkind: command\ncmd: [echo, hi]\noutputs: [data]\n"


def test_command_stages_default_to_one_cpu_process(tmp_path: Path) -> None:
    from orchestrator.config.cluster import load_cluster, stage_problems

    (tmp_path / "prep.yaml").write_text(COMMAND)
    loaded = load_recipe(tmp_path / "prep.yaml")
    assert loaded.recipe.resources.gpus_per_node == 0
    assert loaded.recipe.resources.world_size == 1
    assert stage_problems(loaded, load_cluster(REPO / "clusters" / "local.yaml")) == []
    asked = load_recipe(tmp_path / "prep.yaml", overrides=["resources.gpus_per_node=2"])
    assert asked.recipe.resources.gpus_per_node == 2
    (tmp_path / "stage_a.yaml").write_text(recipe(resources="", train=BATCH_16))
    assert load_recipe(tmp_path / "stage_a.yaml").recipe.resources.gpus_per_node == 8


def test_errors_say_which_values_are_defaults(tmp_path: Path) -> None:
    from orchestrator.config.cluster import load_cluster, stage_problems

    (tmp_path / "stage_a.yaml").write_text(recipe(resources="", train=BATCH_16))
    loaded = load_recipe(tmp_path / "stage_a.yaml")
    local = load_cluster(REPO / "clusters" / "local.yaml")
    (problem,) = stage_problems(loaded, local)
    assert "asks 8 GPUs per node, the default of a train stage" in str(problem)
    written = load_recipe(tmp_path / "stage_a.yaml", overrides=["resources.gpus_per_node=4"])
    (problem,) = stage_problems(written, local)
    assert "asks 4 GPUs per node;" in str(problem) and "default" not in str(problem)
    (tmp_path / "stage_a.yaml").write_text(recipe(resources="", train=BATCH_16,
                                                  parallel="parallel: {cp: 3}"))
    with pytest.raises(ConfigError) as err:
        load_recipe(tmp_path / "stage_a.yaml")
    assert ("world size 8 (1 node x 8 GPUs; 8 GPUs per node is the default of a train stage)"
            in str(err.value))


# ---------------------------------------------------------------------------------------------
# cluster files in `phi4 validate`
# ---------------------------------------------------------------------------------------------


def test_validate_recognises_cluster_files() -> None:
    proc = _phi4("validate", *sorted(str(p) for p in (REPO / "clusters").glob("*.yaml")))
    assert proc.returncode == 0, proc.stderr
    assert "(cluster local)" in proc.stdout and "(cluster example_h100)" in proc.stdout


def test_a_bad_cluster_file_gets_cluster_errors(tmp_path: Path) -> None:
    bad = tmp_path / "site.yaml"
    bad.write_text("name: site\npartition: batch\nmem_per_cpu: lots\n")
    proc = _phi4("validate", str(bad))
    assert proc.returncode == 2
    assert proc.stderr == (f"{bad}:3: mem_per_cpu: memory must be a number with an optional "
                           "K, M, G or T suffix (got 'lots')\n")


def test_plan_refuses_a_cluster_file(tmp_path: Path) -> None:
    proc = _phi4("plan", str(REPO / "clusters" / "local.yaml"), "--store", str(tmp_path))
    assert proc.returncode == 2 and "is a cluster file" in proc.stderr, proc.stderr


def test_cluster_only_keys_follow_the_model() -> None:
    from orchestrator.config.cluster import Cluster
    from orchestrator.config.loader import CLUSTER_ONLY_KEYS, RECIPE_FIELDS

    assert CLUSTER_ONLY_KEYS == set(Cluster.model_fields) - RECIPE_FIELDS


# ---------------------------------------------------------------------------------------------
# profiles: beside the recipes, or a file
# ---------------------------------------------------------------------------------------------


def test_profiles_are_never_taken_from_the_source_checkout(tmp_path: Path) -> None:
    (tmp_path / "stage_a.yaml").write_text(recipe())
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "stage_a.yaml"),
                                      "--profile", "tiny"])
    assert result.exit_code == 2 and "profile not found" in result.output, result.output
    assert str(tmp_path / "profiles") in result.output


def test_profiles_are_found_beside_a_pipelines_recipes(tmp_path: Path) -> None:
    (tmp_path / "stages" / "profiles").mkdir(parents=True)
    (tmp_path / "stages" / "stage_a.yaml").write_text(recipe())
    (tmp_path / "stages" / "profiles" / "short.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "p.yaml").write_text("name: p\nstages: [../stages/stage_a.yaml]\n")
    result = CliRunner().invoke(cli, ["show", str(tmp_path / "flows" / "p.yaml"), "--profile",
                                      "short", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"steps": 3' in result.output
    by_path = CliRunner().invoke(cli, ["validate", str(tmp_path / "stages" / "stage_a.yaml"),
                                       "--profile", str(tmp_path / "stages/profiles/short.yaml")])
    assert by_path.exit_code == 0, by_path.output


def test_the_repository_profiles_still_apply() -> None:
    proc = _phi4("validate", "pipelines/phi4_multimodal.yaml", "recipes/text_pretrain.yaml",
                 "--profile", "tiny")
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# phi4 lr fit: raw sweeps, degenerate fits
# ---------------------------------------------------------------------------------------------


def _raw_sweep(with_loss: bool) -> str:
    import math

    rows = ["tokens,lr,loss" if with_loss else "tokens,lr"]
    for d in (1e10, 2e10, 4e10, 8e10):
        best = 3.0 * d ** -0.32
        for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
            loss = 2.0 + 0.1 * math.log(factor) ** 2
            rows.append(f"{d},{best * factor}" + (f",{loss}" if with_loss else ""))
    return "\n".join(rows) + "\n"


def test_lr_fit_picks_the_best_lr_of_each_budget(tmp_path: Path) -> None:
    import json

    sweep = tmp_path / "sweep.csv"
    sweep.write_text("\ufeff" + _raw_sweep(with_loss=True))  # a BOM, as spreadsheets write
    result = CliRunner().invoke(cli, ["lr", "fit", str(sweep), "--format", "json"])
    assert result.exit_code == 0, result.output
    fit = json.loads(result.output)
    assert abs(fit["exponent"] + 0.32) < 1e-9 and abs(fit["B"] - 3.0) < 1e-6
    assert (fit["points"], fit["runs"]) == (4, 20)


@pytest.mark.parametrize("name,text,expect,line", [
    ("raw_without_loss", _raw_sweep(with_loss=False), "no 'loss' column", 3),
    ("nan_row", "tokens,lr\n1e10,1e-3\n2e10,nan\n4e10,1e-3\n", "not a finite number", 3),
    ("inf_loss", "tokens,lr,loss\n1e10,1e-3,inf\n2e10,1e-3,2\n", "not a finite number", 2),
    ("zero_lr", "tokens,lr\n1e10,0\n2e10,1e-3\n", "must be positive", 2),
    ("one_budget", "tokens,lr,loss\n1e10,1e-3,2.0\n1e10,2e-3,2.1\n", "two or more", None),
    ("no_power_law", "tokens,lr\n1e10,1e-3\n2e10,1e-2\n4e10,1e-4\n8e10,1e-3\n",
     "do not follow a power law", None),
])
def test_lr_fit_refuses_degenerate_sweeps(name: str, text: str, expect: str, line: int | None,
                                          tmp_path: Path) -> None:
    sweep = tmp_path / f"{name}.csv"
    sweep.write_text(text)
    result = CliRunner().invoke(cli, ["lr", "fit", str(sweep)])
    assert result.exit_code == 2, result.output
    assert expect in result.output and "recipe:" not in result.output, result.output
    assert (f"{sweep}:{line}:" if line else f"{sweep}:") in result.output


def test_lr_fit_min_r2_can_be_lowered(tmp_path: Path) -> None:
    sweep = tmp_path / "noisy.csv"
    sweep.write_text("tokens,lr\n1e10,1e-3\n2e10,1e-2\n4e10,1e-4\n8e10,1e-3\n")
    result = CliRunner().invoke(cli, ["lr", "fit", str(sweep), "--min-r2", "0"])
    assert result.exit_code == 0 and "R^2 = 0.1" in result.output, result.output


@pytest.mark.parametrize("args", [["--tokens", "nan", "--B", "3"],
                                  ["--tokens", "1e12", "--B", "inf"],
                                  ["--tokens", "1e12", "--B", "3", "--exponent", "1000"]])
def test_lr_predict_refuses_non_finite(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["lr", "predict", *args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
