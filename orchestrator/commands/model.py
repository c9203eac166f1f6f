"""`phi4 model-info` and `phi4 convert`: torch is imported inside the commands only."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import UsageProblem, quiet_megatron


@click.command("model-info")
@click.argument("preset")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def model_info_cmd(preset: str, fmt: str) -> None:
    """Parameter counts of a model preset, counted from its modules built on the meta device."""
    from phi4core.config import PRESETS

    if preset not in PRESETS:
        from ..config.errors import did_you_mean

        hint = did_you_mean(preset, PRESETS) or f"known: {', '.join(sorted(PRESETS))}"
        raise UsageProblem(f"unknown model preset {preset!r}; {hint}")
    quiet_megatron()
    from phi4core.info import model_info

    info = model_info(preset)
    if fmt == "json":
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{preset}: {info['total']:,} parameters")
    for row in info["rows"]:
        what = f"  {row['what']}" if row.get("what") else ""
        click.echo(f"  {row['name']:<34} {row['parameters']:>15,}{what}")
        if row["name"] == "backbone":
            for part, count in info["parts"].items():
                if count:
                    click.echo(f"    {part:<32} {count:>15,}")
    if info.get("not_built"):
        click.echo(f"  not counted: {', '.join(info['not_built'])} (their modules do not "
                   "exist yet)")


@click.group()
def convert() -> None:
    """Convert between Hugging Face folders (Phi3ForCausalLM; Phi4MultimodalForCausalLM with
    its vision-lora/ and speech-lora/ PEFT adapters, or the original phi4mm) and phi4
    checkpoints."""


def _conversion(fn, src: Path, out: Path) -> None:
    if not src.exists():
        raise UsageProblem(f"{src}: not found")
    quiet_megatron()
    from phi4core.interop.hf import ConversionError

    try:
        result = fn(src, out)
    except ConversionError as err:
        raise UsageProblem(f"{src}: {err}") from None
    click.echo(f"wrote {result}")


@convert.command("hf-to-phi4")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
def hf_to_phi4_cmd(hf_dir: Path, out: Path) -> None:
    """HF folder -> a phi4 checkpoint, usable as a stage input `{path: OUT}`."""
    from phi4core.interop.convert import hf_to_phi4

    _conversion(hf_to_phi4, hf_dir, out)


@convert.command("phi4-to-hf")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--merge-adapter", "merge", multiple=True, type=click.Choice(["vision", "speech"]),
              help="fold this LoRA adapter into the base weights (its folder is left out)")
def phi4_to_hf_cmd(ckpt: Path, out: Path, merge: tuple[str, ...]) -> None:
    """A phi4 checkpoint (e.g. a stage's `model` artifact) -> an HF folder (multimodal: with
    the LoRA adapters as PEFT folders)."""
    from functools import partial

    from phi4core.interop.convert import phi4_to_hf

    _conversion(partial(phi4_to_hf, merge_adapters=merge), ckpt, out)
