"""Process set-up for phi4core's entry points: importing phi4core changes nothing by itself.

`init()` (idempotent) is called first thing by every entry point that builds models: the
trainer (`python -m phi4core train`), the converters (`python -m phi4core.interop`, `phi4
convert`), `phi4 model-info`, `phi4 data`, the benchmarks and the test suite. It

- hides megatron's import-time notices that Transformer Engine and apex are absent (a dozen
  lines on every CPU start-up, and expected there);
- applies the CPU shims (`phi4core.models.cpu_shims`) where no GPU is present; with a GPU it
  changes nothing;
- lets a torchvision whose compiled ops do not match torch import anyway
  (`phi4core.torchvision_compat`), for transformers' processors.

`phi4core.parallel.init_distributed` applies the CPU shims as well, since megatron's parallel
state cannot be built on a CPU without them.
"""

from __future__ import annotations

import warnings

_NOTICES = (".*Transformer Engine.*", ".*[Aa]pex.*")


def quiet_megatron() -> None:
    """Filter megatron's "Transformer Engine / apex not found, falling back" warnings."""
    for message in _NOTICES:
        warnings.filterwarnings("ignore", message=message)


def init() -> None:
    quiet_megatron()
    from phi4core import torchvision_compat

    torchvision_compat.install()
    from phi4core.models import cpu_shims

    cpu_shims.apply()
