"""Exit codes phi4 gives and reads, in Python and in the shell text it writes (batch scripts,
NeMo-Run task scripts): each defined once, here. PREEMPTED is the trainer's own."""

from phi4core.exitcodes import PREEMPTED

OK = 0
FAILURE = 1
BAD_INPUT = 2  # phi4: bad input, one line per problem, never a traceback
SKIP = 3  # `stage-hook begin`: already published (another run finished it); the job ends OK

__all__ = ["OK", "FAILURE", "BAD_INPUT", "SKIP", "PREEMPTED"]
