"""Exit codes shared by the trainer and the executors (torch-free: the orchestrator reads it)."""

# EX_TEMPFAIL: the trainer caught SIGUSR1/SIGTERM, wrote a checkpoint and asks to be requeued.
# Executors record the attempt as `preempted` (resumable), never as `failed`.
PREEMPTED = 75
