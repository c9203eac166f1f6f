"""Plain `${oc.env:...}` interpolation resolved without OmegaConf gives exactly what OmegaConf
gives: the same values and, where resolution fails, the same problems."""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, interpolate, load_pipeline
from orchestrator.config.errors import Origin
from orchestrator.config.interpolate import resolve, resolve_with_omegaconf

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "${oc.env:PHI4_T_VAR}",
    "${oc.env:PHI4_T_VAR,/data/phi4}",
    "${oc.env:PHI4_T_VAR,/data/phi4}/captions/{000000..001023}.tar",
    "pre-${oc.env:PHI4_T_VAR,/a}-mid-${oc.env:PHI4_T_OTHER,/b}-post",
    "${oc.env:PHI4_T_VAR,/models/Phi-4-mini-instruct}",
    "${oc.env:PHI4_T_VAR,rel/path}",
    "${oc.env:PHI4_T_VAR,1/2}",
    "${oc.env:PHI4_T_VAR,/x-1.5e3}",
    "${oc.env:PHI4_T_VAR,./a}",
    "${oc.env:PHI4_T_VAR,/}",
    "${oc.env:PHI4_T_VAR,a/b@c+d%e_f}",
    "${oc.env:PHI4_T_VAR,/a}???",
    "${oc.env:PHI4_T_VAR,/a}?",
    "it's \"${oc.env:PHI4_T_VAR,/a}\" }{ ][ a=b:c, %@\n\ttab",
    "${oc.env:PHI4_T_VAR,/a}${oc.env:PHI4_T_VAR,/b}",
    "{${oc.env:PHI4_T_VAR,/a}}",
    "${oc.env:true,/a}",
    "${oc.env:null}",
    "${oc.env:Inf,/a}",
    # Shapes only OmegaConf handles: spaces, quotes, escapes, non-path defaults, other calls.
    "${ oc.env:PHI4_T_VAR,/a }",
    "${oc.env:PHI4_T_VAR, /a}",
    "${oc.env:PHI4_T_VAR,'/a b'}",
    "${oc.env:PHI4_T_VAR,plain}",
    "${oc.env:PHI4_T_VAR,3}",
    "${oc.env:PHI4_T_VAR,null}",
    "${oc.env:PHI4_T_VAR,}",
    "\\${oc.env:PHI4_T_VAR,/a}",
    "a\\b${oc.env:PHI4_T_VAR,/a}",
    "$${oc.env:PHI4_T_VAR,/a}",
    "${oc.env:PHI4_T_VAR,/a",
    "${oc.env:PHI4_T_VAR,/a}${name}",
    "${oc.select:name,/a}",
    "${oc.decode:${oc.env:PHI4_T_VAR,/a}}",
]

ENV_VALUES = [None, "", "/real/path", "with spaces", "???", "\\???", "a${name}", "x\\y", "?",
              "None", "3", "${oc.env:PHI4_T_OTHER}", "é"]


def _outcome(fn, doc: dict):
    """('ok', value with its types) or ('error', the problems as printed)."""
    try:
        value = fn(doc, {}, Origin("f.yaml"))
    except ConfigError as err:
        return "error", [str(p) for p in err.problems]
    return "ok", _typed(value)


def _typed(value):
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return type(value).__name__, value


@pytest.mark.parametrize("text", TEXTS)
def test_plain_env_matches_omegaconf(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for value, other in itertools.product(ENV_VALUES, (None, "/o")):
        for name, set_to in (("PHI4_T_VAR", value), ("PHI4_T_OTHER", other)):
            if set_to is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, set_to)
        doc = {"name": "n", "tokenizer": text, "data": {"sources": [{"path": text}]}}
        assert _outcome(resolve, doc) == _outcome(resolve_with_omegaconf, doc), (text, value)


@pytest.mark.parametrize("key", ["a.b", "0", "a-b", "a[0]", "a b", "k"])
def test_keys_match_omegaconf(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI4_T_VAR", "/v")
    doc = {"env": {key: "${oc.env:PHI4_T_VAR,/a}"}, "list": [{key: ["${oc.env:PHI4_T_VAR}"]}]}
    assert _outcome(resolve, doc) == _outcome(resolve_with_omegaconf, doc)


def test_dates_pass_through_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A YAML timestamp beside an interpolation reaches the schema untouched (OmegaConf once
    refused it with a traceback)."""
    monkeypatch.delenv("PHI4_T_VAR", raising=False)
    for text in ("${oc.env:PHI4_T_VAR,/a}", "${oc.env:PHI4_T_VAR,/a}${name}"):
        doc = {"name": "n", "description": datetime.date(2024, 1, 2), "tokenizer": text}
        assert _outcome(resolve, doc) == _outcome(resolve_with_omegaconf, doc)
        assert resolve(doc, {}, Origin("f.yaml"))["description"] == datetime.date(2024, 1, 2)


def test_shipped_recipes_skip_omegaconf(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped pipelines interpolate only plain `${oc.env:...}`: no OmegaConf, and the
    same resolved stages as through OmegaConf."""
    fast = load_pipeline(REPO / "pipelines" / "phi4_multimodal.yaml")

    def refuse(*args):
        raise AssertionError("OmegaConf path taken")

    monkeypatch.setattr(interpolate, "resolve_with_omegaconf", refuse)
    load_pipeline(REPO / "pipelines" / "phi4_multimodal.yaml")
    monkeypatch.undo()
    monkeypatch.setattr(interpolate, "_resolve_plain_env", lambda doc: None)
    slow = load_pipeline(REPO / "pipelines" / "phi4_multimodal.yaml")
    assert {n: s.document for n, s in fast.stages.items()} == \
        {n: s.document for n, s in slow.stages.items()}
    assert {n: s.recipe for n, s in fast.stages.items()} == \
        {n: s.recipe for n, s in slow.stages.items()}
