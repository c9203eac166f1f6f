"""Process exit codes of phi4core's entry points (torch-free: the orchestrator reads them).

75 is EX_TEMPFAIL from sysexits.h: the executor requeues a preempted stage instead of failing it.
"""

OK = 0
FAILURE = 1
BAD_SPEC = 2  # a stage spec (or a converter's input) that cannot be used: fix the input
PREEMPTED = 75
