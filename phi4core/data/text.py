"""Text pre-training data: JSONL -> megatron-core indexed dataset (`.bin`/`.idx` + manifest).

The manifest beside the dataset records what went in (sources with sha256, tokenizer hash,
options) and what came out (documents, tokens, skipped records per reason). It is written
last and removed first, so its presence marks a complete dataset, and it lets a rerun with the
same inputs reuse the dataset instead of tokenising again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phi4core.data.jsonl import iter_jsonl
from phi4core.data.report import DataReport, check_policy
from phi4core.data.tokenizer import PhiTokenizer
from phi4core.files import sha256_file, temp_path_beside, write_json

log = logging.getLogger("phi4core.data")

MANIFEST_FORMAT = "phi4.text-indexed.v1"
_BATCH = 1024  # texts per tokenizer call: the Rust tokenizer parallelises within a batch


@dataclass
class PrepareReport(DataReport):
    """A `DataReport` plus what `prepare_text` wrote."""

    out_prefix: str = ""
    manifest_path: str = ""
    num_documents: int = 0
    num_tokens: int = 0
    sources: list[dict] = field(default_factory=list)
    reused: bool = False  # True when an identical earlier run's output was kept as is


def manifest_path(out_prefix: str | os.PathLike) -> Path:
    return Path(f"{out_prefix}.manifest.json")


def _text_records(path: str, text_key: str, report: DataReport, policy) -> Iterable[str]:
    """The usable texts of one JSONL file; bad records go to `report` per `policy`."""
    for where, record in iter_jsonl([path], report, policy):
        if not isinstance(record, dict):
            report.bad(where, "record is not a JSON object", type(record).__name__, policy)
        elif text_key not in record:
            report.bad(where, f"missing key {text_key!r}", "", policy)
        elif not isinstance(record[text_key], str):
            report.bad(where, f"{text_key!r} is not a string",
                       type(record[text_key]).__name__, policy)
        elif not record[text_key].strip():
            report.bad(where, "empty text", "", policy)
        else:
            report.keep()
            yield record[text_key]


def _batched(items: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_text(
    jsonl_paths: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer_dir: str | os.PathLike | PhiTokenizer,
    out_prefix: str | os.PathLike,
    text_key: str = "text",
    on_bad_record: str = "skip",
    append_eod: bool = True,
    force: bool = False,
) -> PrepareReport:
    """Tokenise JSONL records into `<out_prefix>.bin/.idx` with megatron's IndexedDatasetBuilder.

    One record becomes one document (followed by the end-of-document token when `append_eod`).
    Special-token strings inside a text become their special ids, so pre-rendered chat text
    can be pre-training data.
    Bad records (malformed JSON, invalid UTF-8, not an object, missing/non-string/empty text)
    are reported with `file:line` and skipped and counted, or raise `DataError` when
    `on_bad_record="fail"`. Outputs are written under temporary names and renamed into place.
    Unless `force`, an existing complete output made from identical inputs is reused.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    policy = check_policy(on_bad_record)
    paths = [str(jsonl_paths)] if isinstance(jsonl_paths, (str, os.PathLike)) else [
        str(p) for p in jsonl_paths]
    if not paths:
        raise ValueError("prepare_text needs at least one JSONL file")
    tokenizer = (tokenizer_dir if isinstance(tokenizer_dir, PhiTokenizer)
                 else PhiTokenizer.from_dir(tokenizer_dir))
    prefix = str(out_prefix)
    manifest = manifest_path(prefix)
    options = {"text_key": text_key, "append_eod": append_eod, "on_bad_record": policy}
    tok_meta = {"path": str(tokenizer.path), "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod_id}
    hashes = [sha256_file(p) for p in paths]

    if not force and (reused := _reuse(prefix, paths, hashes, tokenizer.sha256, options)):
        return reused

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    report = PrepareReport(name=f"prepare_text({Path(prefix).name})", out_prefix=prefix,
                           manifest_path=str(manifest))
    bin_tmp, idx_tmp = temp_path_beside(prefix + ".bin"), temp_path_beside(prefix + ".idx")
    builder = None
    try:
        builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
        for path, digest in zip(paths, hashes):
            part = DataReport(name="prepare_text")
            for batch in _batched(_text_records(path, text_key, part, policy), _BATCH):
                for ids in tokenizer.encode_batch(batch):
                    if append_eod:
                        ids.append(tokenizer.eod_id)
                    builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                    report.num_documents += 1
                    report.num_tokens += len(ids)
            report.merge(part)
            report.sources.append({"path": path, "sha256": digest, "bytes": os.path.getsize(path),
                                   **part.to_dict()})
        if report.num_documents == 0:
            raise ValueError(f"no usable records in {paths}: {report.summary()}")
        builder.finalize(idx_tmp)
        with contextlib.suppress(FileNotFoundError):
            manifest.unlink()  # from here on the old outputs are no longer vouched for
        os.replace(bin_tmp, prefix + ".bin")
        os.replace(idx_tmp, prefix + ".idx")
    finally:
        if builder is not None:
            builder.data_file.close()  # idempotent; needed when tokenising raised
        for tmp in (bin_tmp, idx_tmp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    write_json(manifest, {
        "format": MANIFEST_FORMAT,
        "prefix": Path(prefix).name,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tok_meta,
        "options": options,
        "sources": report.sources,
        "num_documents": report.num_documents,
        "num_tokens": report.num_tokens,
        "totals": report.to_dict(),
    })
    report.log_summary()
    log.info("wrote %s.bin/.idx: %d documents, %d tokens", prefix, report.num_documents,
             report.num_tokens)
    return report


def _reuse(prefix: str, paths: list[str], hashes: list[str], tok_sha: str,
           options: dict) -> PrepareReport | None:
    """The earlier run's report when its manifest matches these exact inputs, else None."""
    manifest = manifest_path(prefix)
    if not (manifest.is_file() and Path(prefix + ".bin").is_file()
            and Path(prefix + ".idx").is_file()):
        return None
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    same = (
        meta.get("format") == MANIFEST_FORMAT
        and meta.get("tokenizer", {}).get("sha256") == tok_sha
        and meta.get("options") == options
        and [(s["path"], s["sha256"]) for s in meta.get("sources", [])] == list(zip(paths, hashes))
    )
    if not same:
        return None
    totals = meta["totals"]
    report = PrepareReport(
        name=f"prepare_text({Path(prefix).name})", out_prefix=prefix,
        manifest_path=str(manifest), num_documents=meta["num_documents"],
        num_tokens=meta["num_tokens"], sources=meta["sources"], reused=True,
        records_read=totals["records_read"], records_kept=totals["records_kept"],
        blank_lines=totals["blank_lines"], examples=list(totals["examples"]),
    )
    report.skipped.update(totals["skipped_by_reason"])
    report.adjusted.update(totals.get("adjusted", {}))
    log.info("reusing %s.bin/.idx (inputs unchanged; %s)", prefix, report.summary())
    return report
