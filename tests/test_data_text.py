"""prepare_text: JSONL -> megatron .bin/.idx round trip, bad records, manifest, reuse."""

import json

import pytest

from phi4core.data.report import DataError
from phi4core.data.text import manifest_path, prepare_text
from phi4core.data.tokenizer import get_demo_tokenizer
from phi4core.files import sha256_file

TEXTS = ["12 + 7 = 19.", "the red cat sees the big dog.", "count by 2: 4 6 8 10.",
         "ünïcödé text <|endoftext|> inside"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return get_demo_tokenizer(tmp_path_factory.mktemp("tokcache"))


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def _write(path, lines):
    path.write_bytes(b"".join(ln if isinstance(ln, bytes) else ln.encode() + b"\n" for ln in lines))
    return path


def test_round_trip(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", [json.dumps({"text": t}) for t in TEXTS[:2]])
    b = _write(tmp_path / "b.jsonl", [json.dumps({"body": t, "id": 1}) for t in TEXTS[2:]])
    out = tmp_path / "out" / "corpus"
    (tmp_path / "out").mkdir()
    report = prepare_text([a], tok.path, out)
    ds = _indexed(out)
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod_id]
                                                      for t in TEXTS[:2]]
    assert report.num_documents == 2 and report.records_skipped == 0

    # Another key, several files, no end-of-document token.
    report = prepare_text([b, b], tok.path, out, text_key="body", append_eod=False)
    ds = _indexed(out)
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) for t in TEXTS[2:]] * 2
    assert report.num_tokens == sum(len(ds[i]) for i in range(len(ds)))
    assert ds[0].dtype.name == "uint16"  # the demo's 1024-token vocabulary fits 16 bits
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "corpus.bin", "corpus.idx", "corpus.manifest.json"]  # no temporaries left


BAD = [
    json.dumps({"text": "good one."}),  # 1
    "{not json",  # 2
    "",  # 3 blank: counted apart, not a bad record
    json.dumps({"txt": "wrong key"}),  # 4
    json.dumps({"text": "   "}),  # 5
    json.dumps(["a list"]),  # 6
    b"{\"text\": \"bad \xff byte\"}\n",  # 7
    json.dumps({"text": 42}),  # 8
    json.dumps({"text": "good two."}),  # 9
]


def test_bad_records_skipped_with_file_and_line(tmp_path, tok):
    src = _write(tmp_path / "bad.jsonl", BAD)
    report = prepare_text([src], tok.path, tmp_path / "ds", on_bad_record="skip")
    assert report.records_read == 8 and report.records_kept == 2 and report.blank_lines == 1
    assert dict(report.skipped) == {
        "malformed json": 1, "missing key 'text'": 1, "empty text": 1,
        "record is not a JSON object": 1, "invalid utf-8": 1, "'text' is not a string": 1}
    wheres = [e.split(": ")[0] for e in report.examples]
    assert wheres == [f"{src}:{n}" for n in (2, 4, 5, 6, 7, 8)]
    assert len(_indexed(tmp_path / "ds")) == 2
    manifest = json.loads(manifest_path(tmp_path / "ds").read_text())
    assert manifest["sources"][0]["sha256"] == sha256_file(src)
    assert manifest["sources"][0]["skipped_by_reason"]["malformed json"] == 1
    assert manifest["totals"]["records_skipped"] == 6
    assert manifest["tokenizer"]["sha256"] == tok.sha256


def test_bad_record_fails_with_file_and_line(tmp_path, tok):
    src = _write(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(DataError) as err:
        prepare_text([src], tok.path, tmp_path / "ds", on_bad_record="fail")
    assert err.value.where == f"{src}:2" and err.value.reason == "malformed json"
    assert str(err.value).startswith(f"{src}:2: malformed json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written
    with pytest.raises(ValueError, match="on_bad_record"):
        prepare_text([src], tok.path, tmp_path / "ds", on_bad_record="ignore")


def test_all_bad_is_an_error_not_an_empty_dataset(tmp_path, tok):
    src = _write(tmp_path / "bad.jsonl", ["{oops", json.dumps({"text": ""})])
    with pytest.raises(ValueError, match="no usable records"):
        prepare_text([src], tok.path, tmp_path / "ds")
    assert not (tmp_path / "ds.bin").exists()


def test_rerun_reuses_unless_inputs_change(tmp_path, tok):
    src = _write(tmp_path / "a.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    first = prepare_text([src], tok.path, tmp_path / "ds")
    again = prepare_text([src], tok.path, tmp_path / "ds")
    assert not first.reused and again.reused
    assert again.to_dict() == first.to_dict() and again.num_tokens == first.num_tokens
    _write(src, [json.dumps({"text": t}) for t in TEXTS[:1]])
    changed = prepare_text([src], tok.path, tmp_path / "ds")
    assert not changed.reused and len(_indexed(tmp_path / "ds")) == 1
    assert not prepare_text([src], tok.path, tmp_path / "ds", append_eod=False).reused
    assert not prepare_text([src], tok.path, tmp_path / "ds", append_eod=False, force=True).reused
