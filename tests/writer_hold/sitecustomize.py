"""Test shim (on PYTHONPATH only in the tests that want it): holds megatron's checkpoint writer
in the middle of writing one checkpoint, so that a test can signal a stage while a checkpoint
is being written.

With PHI4_TEST_HOLD_WRITE=DIR and PHI4_TEST_HOLD_STEP=N, the first writer process about to
fsync a file of `checkpoints/tmp.step_N/` writes its pid to DIR/writing; every such fsync waits
while DIR/hold exists (at most 10 minutes, so that a broken test cannot hang for ever).
"""

import os
import time

_DIR = os.environ.get("PHI4_TEST_HOLD_WRITE")
_STEP = os.environ.get("PHI4_TEST_HOLD_STEP")

if _DIR and _STEP:
    _fsync = os.fsync
    _marker = f"/checkpoints/tmp.step_{_STEP}/"

    def _held_fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        except OSError:
            path = ""
        if _marker in path and not os.path.exists(os.path.join(_DIR, "writing")):
            tmp = os.path.join(_DIR, f".writing.{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(str(os.getpid()))
            os.replace(tmp, os.path.join(_DIR, "writing"))
            deadline = time.monotonic() + 600
            while os.path.exists(os.path.join(_DIR, "hold")) and time.monotonic() < deadline:
                time.sleep(0.05)
        return _fsync(fd)

    os.fsync = _held_fsync
