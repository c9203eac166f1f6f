"""What publishing and input verification cost, against hashing the same bytes once (the
reference, measured in the same run): publish (settle links, read-only, hash), then one
consumer's input verification before and after it, fresh (files just written: not cached)
and once the hash cache applies.

    PYTHONPATH=. python bench/store_verify.py [MiB]
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator import manifest as mf  # noqa: E402
from orchestrator.records import InputRecord, State  # noqa: E402
from orchestrator.store import Store  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(mib: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        folder = store.stage_dir("up", "f" * 16)
        folder.begin("local", command=[], reasons=[], inputs={})
        out = folder.staging / "out"
        out.mkdir()
        block = os.urandom(1 << 20)
        for i in range(8):  # eight shards, like a sharded checkpoint
            with open(out / f"shard{i}.bin", "wb") as f:
                for _ in range(mib // 8):
                    f.write(block)

        def reference() -> None:
            for path in sorted(out.iterdir()):
                hashlib.sha256(path.read_bytes()).hexdigest()

        ref = _timed(reference)
        publish = _timed(lambda: folder.publish(["out"]))
        folder.end(State.SUCCEEDED, exit_code=0)
        consumer = store.stage_dir("down", "d" * 16)
        inputs = store.with_digests({"up": InputRecord(
            source="stage", path=str(folder.artifacts / "out"), stage="up",
            fingerprint=folder.fingerprint, artifact="out")})
        fresh = _timed(lambda: consumer.input_problem(inputs))
        mf.RACY_SECONDS = 0.0  # as if the artifact were older than the racy window
        consumer.input_problem(inputs)  # fills the cache
        cached = _timed(lambda: consumer.input_problem(inputs))
        print(f"artifact {mib} MiB in 8 files; reference: sha256 once {ref:.3f}s")
        for label, seconds in (("publish", publish), ("verify inputs, not cached", fresh),
                               ("verify inputs, cached", cached)):
            print(f"{label:>28}: {seconds:.4f}s  ratio to reference {seconds / ref:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
