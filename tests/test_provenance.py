"""`phi4 show --explain`: each resolved value with the file:line and layer it came from."""

from __future__ import annotations

from click.testing import CliRunner

from orchestrator.cli import cli


def _lines(*args: str) -> dict[str, str]:
    out = CliRunner().invoke(cli, ["show", *args, "--explain"])
    assert out.exit_code == 0, out.output
    return {line.split("=")[0].strip(): line for line in out.output.splitlines()
            if "=" in line and line.startswith("  ") and not line.startswith("    ")}


def test_explain_names_every_layer():
    lines = _lines("pipelines/phi4_multimodal_from_mini.yaml", "--profile", "tiny",
                   "--set", "vision_sft.train.lr=0.5")
    # Lines are per stage; the last stage's win in this dict, so look at joined text too.
    text = "\n".join(lines.values())
    assert "recipes/_base/common.yaml:" in lines["train.weight_decay"]
    assert lines["train.weight_decay"].endswith("(extends)")
    assert "recipes/profiles/tiny.yaml:" in lines["train.steps"]
    assert lines["train.steps"].endswith("(profile)")
    assert "phi4_multimodal_from_mini.yaml:6 (pipeline)" in lines["inputs.backbone.hf"]
    assert lines["parallel.recompute"].endswith("(default)")
    assert "vision_speech_joint.yaml:" in lines["name"] and "(recipe)" in lines["name"]
    assert "--set" not in text  # the override reaches vision_sft only
    sft = CliRunner().invoke(cli, ["show", "pipelines/phi4_multimodal_from_mini.yaml",
                                   "--profile", "tiny", "--set", "vision_sft.train.lr=0.5",
                                   "--explain"]).output.split("stage vision_sft")[1]
    sft = sft.split("\nstage ")[0]
    (lr,) = [x for x in sft.splitlines() if x.strip().startswith("train.lr ")]
    assert "= 0.5" in lr and lr.endswith("--set vision_sft.train.lr=0.5 (--set)")
    assert "differs from its extends base:" in sft
    assert 'precision.params: "bf16" -> "fp32"' in sft
