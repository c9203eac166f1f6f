"""`phi4 data`: dataset preparation (megatron indexed datasets from JSONL)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import UsageProblem, quiet_megatron


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
