"""Process exit codes of `python -m phi4core train` (torch-free: the orchestrator reads them).

75 is EX_TEMPFAIL from sysexits.h: the executor requeues a preempted stage instead of failing it.
"""

OK = 0
FAILURE = 1
BAD_SPEC = 2
PREEMPTED = 75

NAMES = {OK: "ok", FAILURE: "failure", BAD_SPEC: "bad spec", PREEMPTED: "preempted"}
