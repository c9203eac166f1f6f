"""`phi4 data`: dataset preparation (megatron indexed datasets from JSONL, energon image
datasets, lhotse speech corpora, the demo corpus) and the preview of a stage's training
sequences."""

from __future__ import annotations

from pathlib import Path

import click

from .common import UsageProblem, config_options, quiet_megatron, report_config_errors


@click.group()
def data() -> None:
    """Prepare training data."""


@data.command("prepare-text")
@click.argument("jsonl", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer_dir", required=True, metavar="DIR",
              help="Folder with tokenizer.json, or 'demo' for the bundled small BPE.")
@click.option("--out", "out_prefix", required=True, metavar="PREFIX",
              help="Writes PREFIX.bin, PREFIX.idx and PREFIX.manifest.json.")
@click.option("--text-key", default="text", show_default=True)
@click.option("--on-bad-record", type=click.Choice(["skip", "fail"]), default="skip",
              show_default=True)
def prepare_text_cmd(jsonl: tuple[Path, ...], tokenizer_dir: str, out_prefix: str,
                     text_key: str, on_bad_record: str) -> None:
    """Tokenise JSONL records ({"text": ...}) into a megatron indexed dataset."""
    missing = [str(p) for p in jsonl if not p.is_file()]
    if missing:
        raise UsageProblem(f"{missing[0]}: file not found")
    quiet_megatron()
    from phi4core.data.report import DataError
    from phi4core.data.text import prepare_text

    if tokenizer_dir == "demo":
        import os

        from phi4core.data.tokenizer import get_demo_tokenizer

        cache = os.environ.get("PHI4_CACHE", str(Path.home() / ".cache" / "phi4"))
        tokenizer_dir = str(get_demo_tokenizer(cache).path)
    elif not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise UsageProblem(f"{tokenizer_dir}: no tokenizer.json in this folder")
    try:
        report = prepare_text(list(jsonl), tokenizer_dir, out_prefix, text_key=text_key,
                              on_bad_record=on_bad_record)
    except DataError as err:
        raise UsageProblem(str(err)) from None
    click.echo(report.summary())


@data.command("demo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True,
              help="The same seed writes the same bytes.")
@click.option("--pack/--no-pack", default=True, show_default=True,
              help="Also build the loaders' datasets (pack-images, prepare-speech).")
def demo_cmd(out: Path, seed: int, pack: bool) -> None:
    """Write the demo corpus to OUT: text, chat and tool-call JSONL; shape images with
    captions and conversations; speech-like clips with transcripts and translations; each
    with a held-out split, packed for the energon and lhotse loaders. No download; seconds."""
    from phi4core.data.demo_corpus import CorpusExists, write_demo_corpus

    try:
        info = write_demo_corpus(out, seed=seed, pack=pack)
    except CorpusExists as err:
        raise UsageProblem(str(err)) from None
    except OSError as err:
        raise UsageProblem(f"{out}: cannot write the demo corpus: {err}") from None
    counts = ", ".join(f"{kind} {c['train']}+{c['heldout']}" for kind, c in info["counts"].items())
    click.echo(f"demo corpus in {out}: {counts} (train+held-out records)")
    for folder, samples in info.get("loaders", {}).items():
        click.echo(f"  {out / folder}: {samples} samples")


@data.command("prepare-speech")
@click.option("--audio", "audio_dir", required=True, metavar="DIR",
              type=click.Path(path_type=Path), help="Folder of WAV/FLAC clips (16 kHz, mono).")
@click.option("--transcripts", required=True, metavar="FILE", type=click.Path(path_type=Path),
              help='JSONL, one clip a line: {"audio": "rel/path.wav", "text": "..."}, '
                   "optional translation, language, question, answer, summary.")
@click.option("--out", "out_dir", required=True, metavar="DIR", type=click.Path(path_type=Path),
              help="The prepared folder: cuts.jsonl.gz, report.json (features.lca).")
@click.option("--features", is_flag=True,
              help="Also precompute Phi-4's 80-bin features (lilcom-compressed).")
@click.option("--on-bad-record", type=click.Choice(["skip", "fail"]), default="skip",
              show_default=True)
def prepare_speech_cmd(audio_dir: Path, transcripts: Path, out_dir: Path, features: bool,
                       on_bad_record: str) -> None:
    """Build a lhotse speech corpus (a `{kind: lhotse}` source) from a folder of clips."""
    if not audio_dir.is_dir():
        raise UsageProblem(f"{audio_dir}: no such folder (--audio)")
    if not transcripts.is_file():
        raise UsageProblem(f"{transcripts}: file not found (--transcripts)")
    from phi4core.data.report import DataError
    from phi4core.data.speech_prepare import prepare_speech

    try:
        report = prepare_speech(audio_dir, transcripts, out_dir, features=features,
                                on_bad_record=on_bad_record)
    except DataError as err:
        raise UsageProblem(f"{err}; nothing written (--on-bad-record skip counts such "
                           "records instead)") from None
    except OSError as err:  # an unwritable --out, a full disk
        raise UsageProblem(f"cannot write {out_dir}: {err}") from None
    click.echo(report.summary())  # each skipped record was logged with its file:line
    click.echo(f"wrote {out_dir}")


@data.command("pack-images")
@click.option("--images", "images_dir", required=True, metavar="DIR",
              type=click.Path(path_type=Path), help="Folder the records' image paths are in.")
@click.option("--captions", required=True, metavar="JSONL", type=click.Path(path_type=Path),
              help='Lines {"image", "caption"}, {"images", "messages"} or {"images", "text"}.')
@click.option("--out", required=True, metavar="DIR", type=click.Path(path_type=Path),
              help="New folder: WebDataset shards and energon's .nv-meta/.")
@click.option("--shard-size", default=1000, show_default=True, type=int,
              help="Samples per shard.")
@click.option("--on-bad-record", type=click.Choice(["skip", "fail"]), default="skip",
              show_default=True)
def pack_images_cmd(images_dir: Path, captions: Path, out: Path, shard_size: int,
                    on_bad_record: str) -> None:
    """Pack images and their captions or conversations into an energon dataset."""
    import logging

    from phi4core.data.pack_images import PackError, pack_images
    from phi4core.data.report import DataError

    logging.getLogger("phi4core.data").setLevel(logging.ERROR)  # listed below, all of them
    try:
        result = pack_images(images_dir, captions, out, shard_size=shard_size,
                             on_bad_record=on_bad_record)
    except (PackError, DataError) as err:
        raise UsageProblem(str(err)) from None
    for line in result.report.examples:
        click.echo(f"skipped {line}")
    click.echo(f"{result.report.summary()}")
    click.echo(f"wrote {result.samples} samples in {result.shards} shards to {result.out} "
               f"(energon dataset; a recipe source: {{kind: webdataset, path: {result.out}}})")


@data.command("preview")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@config_options
@click.option("--n", "count", type=click.IntRange(min=1, max=100), default=3, show_default=True,
              help="How many training sequences to show.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@report_config_errors
def preview_cmd(recipe: str, profile: str | None, overrides: tuple[str, ...], count: int,
                fmt: str) -> None:
    """A train stage's first sequences as the model sees them: the rendered chat template,
    the tokens that carry loss, packing boundaries, truncation, image/audio placeholders, and
    the data report (records kept, skipped and truncated, with reasons)."""
    import json
    import tempfile

    from ..config import load_recipe
    from ..config.checks import expand_groups, model_of

    loaded = load_recipe(recipe, profile, overrides)
    r = loaded.recipe
    if r.kind != "train" or r.data is None or r.train is None:
        raise UsageProblem(f"{recipe}: a {r.kind} stage has no training data to preview")
    model = model_of(r)
    if model is None:
        raise UsageProblem(f"{recipe}: unknown model preset {r.model.preset!r}")
    quiet_megatron()
    from phi4core.config import StageSpec
    from phi4core.data.preview import preview
    from phi4core.data.report import DataError
    from phi4core.train.data import DataSpecError

    with tempfile.TemporaryDirectory(prefix="phi4-preview-") as tmp:
        groups = model.module_groups
        spec = StageSpec(name=r.name, fingerprint="preview", model=model, tokenizer=r.tokenizer,
                         outputs=r.outputs, trainable=sorted(expand_groups(r.trainable, groups)),
                         frozen=sorted(expand_groups(r.frozen, groups)), data=r.data,
                         train=r.train, parallel=r.parallel, precision=r.precision,
                         stage_dir=tmp, output_dir=tmp)
        try:
            shown = preview(spec, count)
        except (DataError, DataSpecError, FileNotFoundError, KeyError, ValueError) as err:
            raise UsageProblem(f"{recipe}: {err}") from None
    if fmt == "json":
        click.echo(json.dumps(shown, indent=1))
    else:
        click.echo("\n".join(shown["lines"]))
