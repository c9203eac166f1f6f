"""`python -m orchestrator.executors.nemo_driver TASKS.json`: builds and runs the NeMo-Run
experiment that `phi4 run --executor nemo_run` described. A module of its own, with a main
guard, because NeMo-Run executes the driver's `__main__` again when it reloads an experiment."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from orchestrator.executors.nemo_run import NemoRunMissing, run_document
    from orchestrator.exitcodes import BAD_INPUT

    with open(argv[0]) as f:
        doc = json.load(f)
    try:
        return run_document(doc)
    except NemoRunMissing as err:
        print(err, file=sys.stderr)
        return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
