from orchestrator.records import EvaluationRecord
from orchestrator.store import Store
from phi4core.files import write_json


def test_evaluation_record_round_trip(tmp_path):
    sd = Store(tmp_path).stage_dir("s", "f" * 16)
    assert sd.evaluation() is None
    sd.path.mkdir(parents=True)
    write_json(sd.evaluation_file, {"stage": "s", "fingerprint": "f" * 16, "results": [
        {"name": "acc", "value": 0.9, "chance": 0.25, "samples": 40}]})
    rec = sd.evaluation()
    assert isinstance(rec, EvaluationRecord) and rec.result("acc").value == 0.9
    assert rec.result("acc", model="base") is None
    sd.evaluation_file.write_text("{broken")
    assert sd.evaluation() is None
