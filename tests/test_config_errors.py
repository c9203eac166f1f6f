"""Table of malformed inputs: each exits 2, names file and line, prints no traceback.

A case's YAML marks the line the error must point at with `# <-`; `{base}` expands to a valid
stand-alone recipe so each case changes just one thing.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli

REPO = Path(__file__).resolve().parents[1]

VALID = """\
name: stage_a
model: {preset: phi4_mini, size: tiny}
tokenizer: demo
trainable: [backbone]
outputs: [model]
data:
  sources: [{kind: synthetic, modality: text}]
train:
  steps: 10
  seq_length: 64
  global_batch_size: 4
  micro_batch_size: 2
  lr: 1.0e-3
precision: {params: fp32, fp8: "off"}
resources: {nodes: 1, gpus_per_node: 0}
"""


def recipe(**replace: str) -> str:
    """VALID with whole top-level blocks replaced (value '' removes the block)."""
    blocks: dict[str, str] = {}
    key = None
    for line in VALID.splitlines(keepends=True):
        if not line.startswith(" "):
            key = line.split(":")[0]
            blocks[key] = ""
        blocks[key] += line
    for k, text in replace.items():
        blocks[k] = text if text.endswith("\n") or not text else text + "\n"
    return "".join(blocks.values())


@dataclass
class Case:
    id: str
    files: dict[str, str | bytes]
    expect: str
    target: str = "stage_a.yaml"
    args: list[str] = field(default_factory=list)
    where: str | None = None  # "file" (default: marked line), or a literal prefix like "--set"


CASES = [
    Case("yaml_syntax", {"stage_a.yaml": "name: stage_a\ntrain: [1, 2\nx: 1  # <-\n"},
         "YAML syntax error"),
    Case("unknown_key", {"stage_a.yaml": recipe() + "trian: {steps: 3}  # <-\n"},
         "did you mean 'train'?"),
    Case("unknown_nested_key", {"stage_a.yaml": recipe(parallel="parallel: {tpp: 2}  # <-")},
         "parallel.tpp: unknown key; did you mean 'tp'?"),
    Case("wrong_type", {"stage_a.yaml": recipe(train="train:\n  steps: many  # <-\n"
                                                     "  seq_length: 64\n"
                                                     "  global_batch_size: 4\n  lr: 1.0e-3\n")},
         "train.steps: Input should be a valid integer"),
    Case("missing_field", {"stage_a.yaml": recipe(train="train:  # <-\n  steps: 10\n"
                                                        "  global_batch_size: 4\n  lr: 1.0e-3\n")},
         "train.seq_length: required field is missing"),
    Case("bad_interpolation", {"stage_a.yaml": recipe(tokenizer="tokenizer: ${train.nope}  # <-")},
         "cannot resolve interpolation"),
    Case("unset_env_var",
         {"stage_a.yaml": recipe(tokenizer="tokenizer: ${oc.env:PHI4_TEST_SURELY_UNSET}  # <-")},
         "environment variable PHI4_TEST_SURELY_UNSET is not set"),
    Case("forbidden_resolver",
         {"stage_a.yaml": recipe(tokenizer="tokenizer: ${eval:'__import__(\"os\")'}  # <-")},
         "resolver 'eval' is not allowed"),
    Case("extends_cycle", {"stage_a.yaml": "extends: b.yaml\n" + recipe(),
                           "b.yaml": "extends: stage_a.yaml  # <-\n"},
         "extends cycle", where="b.yaml"),
    Case("missing_extends", {"stage_a.yaml": "extends: nowhere.yaml  # <-\n" + recipe()},
         "extended file not found"),
    Case("input_missing_stage",
         {"stage_a.yaml": recipe(name="name: stage_a\ninputs:\n"
                                      "  backbone: {stage: stage_b, artifact: model}  # <-")},
         "no stage 'stage_b'"),
    Case("input_misspelt_stage",
         {"stage_a.yaml": recipe(name="name: stage_a\ninputs:\n"
                                      "  backbone: {stage: stage_bb, artifact: model}  # <-"),
          "stage_b.yaml": recipe(name="name: stage_b")},
         "did you mean 'stage_b'?"),
    Case("input_missing_artifact",
         {"stage_a.yaml": recipe(name="name: stage_a\ninputs:\n"
                                      "  backbone: {stage: stage_b, artifact: vision}  # <-"),
          "stage_b.yaml": recipe(name="name: stage_b")},
         "stage 'stage_b' has no output 'vision'"),
    Case("input_two_sources",
         {"stage_a.yaml": recipe(name="name: stage_a\ninputs:\n"
                                      "  backbone: {path: /x, hf: /y}  # <-")},
         "needs exactly one of"),
    Case("tp_not_dividing_heads",
         {"stage_a.yaml": recipe(model="model: {preset: phi4_mini}",
                                 parallel="parallel:\n  tp: 5  # <-",
                                 resources="resources: {nodes: 1, gpus_per_node: 10}")},
         "tp must divide the 24 query heads and 8 KV heads"),
    Case("pp_not_dividing_layers",
         {"stage_a.yaml": recipe(model="model: {preset: phi4_mini}",
                                 parallel="parallel:\n  pp: 5  # <-",
                                 resources="resources: {nodes: 1, gpus_per_node: 5}")},
         "must divide the 32 layers"),
    Case("world_not_divisible",
         {"stage_a.yaml": recipe(parallel="parallel: {tp: 2}",
                                 resources="resources: {nodes: 1, gpus_per_node: 3}  # <-")},
         "is not divisible by tp*pp*cp = 2"),
    Case("sequence_parallel_tp1",
         {"stage_a.yaml": recipe(parallel="parallel:\n  sequence_parallel: true  # <-")},
         "sequence parallelism needs tp > 1"),
    Case("batch_not_divisible",
         {"stage_a.yaml": recipe(train="train:\n  steps: 10\n  seq_length: 64\n"
                                       "  global_batch_size: 5  # <-\n  micro_batch_size: 2\n"
                                       "  lr: 1.0e-3\n")},
         "must be divisible by micro_batch_size"),
    Case("fp8_needs_bf16",
         {"stage_a.yaml": recipe(precision="precision:\n  params: fp32\n  fp8: hybrid  # <-",
                                 resources="resources: {nodes: 1, gpus_per_node: 1}")},
         "FP8 training needs bf16 params"),
    Case("trainable_and_frozen",
         {"stage_a.yaml": recipe(trainable="trainable: [backbone]\nfrozen: [backbone]  # <-")},
         "'backbone' is both trainable and frozen"),
    Case("nothing_trainable", {"stage_a.yaml": recipe(trainable="trainable: []  # <-")},
         "must train something"),
    Case("unknown_group", {"stage_a.yaml": recipe(trainable="trainable: [backbon]  # <-")},
         "did you mean 'backbone'?"),
    Case("group_absent_from_model",
         {"stage_a.yaml": recipe(trainable="trainable: [lora.vision]  # <-")},
         "matches no module group of this model"),
    Case("output_not_an_artifact", {"stage_a.yaml": recipe(outputs="outputs: [weights]  # <-")},
         "a train stage's output is an artifact kind"),
    Case("output_absent_from_model",
         {"stage_a.yaml": recipe(outputs="outputs: [model, vision]  # <-")},
         "this model has none of the artifact's module groups"),
    Case("trained_groups_not_in_outputs",
         {"stage_a.yaml": recipe(model="model: {preset: phi4_multimodal, size: tiny}",
                                 trainable="trainable: [lora.speech]",
                                 outputs="outputs: [vision]  # <-")},
         "trainable lora.speech in none of the outputs"),
    Case("steps_and_tokens",
         {"stage_a.yaml": recipe(train="train:  # <-\n  steps: 10\n  tokens: 1000\n"
                                       "  seq_length: 64\n  global_batch_size: 4\n  lr: 1.0e-3\n")},
         "give exactly one of `steps` or `tokens`"),
    Case("misspelt_choice",
         {"stage_a.yaml": recipe(train="train:\n  steps: 10\n  seq_length: 64\n"
                                       "  global_batch_size: 4\n  lr: 1.0e-3\n"
                                       "  schedule: cosin  # <-\n")},
         "did you mean 'cosine'?"),
    Case("name_with_slash", {"stage_a.yaml": recipe(name="name: stages/a  # <-")},
         "must be an identifier"),
    Case("name_with_dot", {"stage_a.yaml": recipe(name="name: stage.a  # <-")},
         "must be an identifier"),
    Case("bad_time", {"stage_a.yaml": recipe(resources="resources:\n  time: 4h  # <-")},
         "time must look like HH:MM:SS"),
    Case("python_tag",
         {"stage_a.yaml": recipe(tokenizer="tokenizer: !!python/object:os.system x  # <-")},
         "is not allowed"),
    Case("alias_bomb", {"stage_a.yaml": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                                        "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                                        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
                                        "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                                        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]  # <-\n"
                                        "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"},
         "alias bomb"),
    Case("duplicate_key", {"stage_a.yaml": recipe() + "name: again  # <-\n"}, "duplicate key"),
    Case("empty_file", {"stage_a.yaml": ""}, "file is empty", where="stage_a.yaml:1"),
    Case("binary_file", {"stage_a.yaml": b"\x7fELF\x02\x01\x01\x00\x00\x00"}, "binary file",
         where="stage_a.yaml:1"),
    Case("top_level_list", {"stage_a.yaml": "- name: a  # <-\n"}, "expected a mapping"),
    Case("missing_file", {}, "file not found", target="nope.yaml", where="nope.yaml"),
    Case("bad_set_value", {"stage_a.yaml": recipe()},
         "train.steps: Input should be a valid integer",
         args=["--set", "train.steps=lots"], where="--set train.steps=lots"),
    Case("bad_set_key", {"stage_a.yaml": recipe()}, "did you mean 'train'?",
         args=["--set", "trian.steps=3"], where="--set trian.steps=3"),
    Case("bad_set_syntax", {"stage_a.yaml": recipe()}, "must look like key.path=value",
         args=["--set", "train.steps"], where="--set train.steps"),
    Case("unknown_profile", {"stage_a.yaml": recipe()}, "profile not found",
         args=["--profile", "tinyy"], where="--profile tinyy"),
    Case("pipeline_missing_stage",
         {"p.yaml": "name: p\nstages: [stage_a.yaml]\n",
          "stage_a.yaml": recipe(name="name: stage_a\ninputs:\n"
                                      "  backbone: {stage: stage_c, artifact: model}  # <-")},
         "no stage 'stage_c' in this pipeline", target="p.yaml", where="stage_a.yaml"),
    Case("pipeline_duplicate_stage",
         {"p.yaml": "name: p\nstages:\n  - stage_a.yaml\n  - stage_a.yaml  # <-\n",
          "stage_a.yaml": recipe()},
         "two stages are named 'stage_a'", target="p.yaml"),
    Case("unterminated_interpolation",
         {"stage_a.yaml": recipe(tokenizer='tokenizer: "${oc.env:HOME"  # <-')},
         "malformed interpolation"),
    Case("profile_stage_overlay_not_mapping",
         {"stage_a.yaml": recipe(), "prof.yaml": "stages:\n  stage_a: [1]  # <-\n"},
         "expected a mapping", args=["--profile", "prof.yaml"], where="prof.yaml:2"),
    Case("profile_unknown_stage",
         {"stage_a.yaml": recipe(),
          "prof.yaml": "stages:\n  stage_aa: {train: {steps: 3}}  # <-\n"},
         "did you mean 'stage_a'?", args=["--profile", "prof.yaml"], where="prof.yaml:2"),
    Case("set_through_a_list", {"stage_a.yaml": recipe()}, "is not an index of the list",
         args=["--set", "data.sources.7.weight=2"], where="--set data.sources.7.weight=2"),
    Case("set_into_a_scalar", {"stage_a.yaml": recipe()}, "is not a mapping",
         args=["--set", "train.steps.x=2"], where="--set train.steps.x=2"),
    Case("pipeline_entry_typo",
         {"p.yaml": "name: p\nstages:\n  - {recipe: stage_a.yaml, overides: {}}  # <-\n",
          "stage_a.yaml": recipe()},
         "stages[0].overides: unknown key; did you mean 'overrides'?", target="p.yaml"),
    Case("pipeline_missing_recipe",
         {"p.yaml": "name: p\nstages:\n  - stage_z.yaml  # <-\n"}, "recipe file not found",
         target="p.yaml"),
]


def _marked_line(text: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.rstrip().endswith("# <-"):
            return number
    raise AssertionError("case has no '# <-' marker")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, content in case.files.items():
        target = tmp_path / name
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PHI4_TEST_SURELY_UNSET", raising=False)
    result = CliRunner().invoke(cli, ["validate", case.target, *case.args])
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    assert case.expect in output, output
    if case.where is None:
        marked = next(n for n, c in case.files.items() if isinstance(c, str) and "# <-" in c)
        where = f"{marked}:{_marked_line(case.files[marked])}: "
    else:
        where = case.where
    assert where in output, f"expected {where!r} in:\n{output}"


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 25


def test_errors_through_the_real_command(tmp_path: Path) -> None:
    """The console script, not just click's runner: exit 2, one line, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe(parallel="parallel: {tp: 4}"))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(bad)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}:" in proc.stderr and "parallel.tp" in proc.stderr


def test_one_line_per_bad_pipeline_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.yaml").write_text("name: p\nstages:\n  - {recipe: a.yaml, overides: {}}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["validate", "p.yaml"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
