"""Exit codes shared by the trainer and the executors; torch-free so the orchestrator can read it."""

# EX_TEMPFAIL: the trainer caught SIGUSR1/SIGTERM, wrote a checkpoint and asks to be requeued.
# Executors record the attempt as `preempted` (resumable), never as `failed`.
PREEMPTED = 75
