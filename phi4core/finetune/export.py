"""`kind: export`: a fine-tuned adapter out of phi4, for transformers + peft (and vLLM).

    peft/  the adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors) that
           `PeftModel.from_pretrained` loads on the released model; a text model's adapter
           names the base folder in `base_model_name_or_path`
    hf/    a whole Hugging Face folder with the tokenizer and its chat template: for a text
           model the base with the adapter merged into its weights (Phi3ForCausalLM); for
           Phi-4-multimodal the released layout with the fine-tuned adapter in place of its
           own (`vision-lora/`, ...), since merging would change the other modes

Both are written in the base folder's dtype (fp32 when the base is phi4 weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

from phi4core import exitcodes
from phi4core.config import ToolSpec
from phi4core.finetune import inputs as fin

log = logging.getLogger("phi4core.finetune")


def _dtype(spec: ToolSpec):
    import torch

    from phi4core.interop.hf import HFCheckpoint

    for inp in spec.inputs.values():
        if inp.source == "hf":
            try:
                return HFCheckpoint(inp.path).dtype()
            except Exception:  # a folder without weights of its own: keep going
                continue
    return torch.float32


def export(spec: ToolSpec) -> dict[str, Path]:
    """Write each declared output (peft, hf) under spec.output_dir; returns them."""
    from phi4core.interop import hf_multimodal
    from phi4core.interop.hf import save_hf
    from phi4core.interop.lora_adapters import save_adapter
    from phi4core.models.lora import merge_adapter

    mc = fin.model_config(spec.inputs)
    adapters = fin.trained_adapters(mc, spec.inputs)
    if not adapters:
        raise fin.InputError("no input brings a LoRA adapter to export (an `adapter` artifact "
                             "of a fine-tuning stage)")
    chunks = fin.build(mc)
    for name, inp in spec.inputs.items():
        log.info("input %s: %s", name, ", ".join(fin.load(chunks, mc, name, inp)))
    dtype = _dtype(spec)
    multimodal = hf_multimodal.is_multimodal(mc)
    base = next((Path(i.path).resolve() for i in spec.inputs.values() if i.source == "hf"), None)
    out = Path(spec.output_dir)
    written = {}
    if "peft" in spec.outputs:
        if len(adapters) > 1:
            raise fin.InputError(f"the inputs bring several adapters ({', '.join(adapters)}): "
                                 "a PEFT folder holds one")
        written["peft"] = save_adapter(chunks, adapters[0], out / "peft", dtype=dtype,
                                       config_update=_peft_config(multimodal, base))
    if "hf" in spec.outputs:
        if not multimodal:
            for adapter in adapters:
                merge_adapter(chunks, adapter)
        written["hf"] = save_hf(chunks, out / "hf", mc, dtype=dtype,
                                tokenizer_dir=fin.tokenizer_dir(spec.inputs))
    return written


def _peft_config(multimodal: bool, base: Path | None) -> dict:
    from phi4core.interop.hf_multimodal import PEFT_TARGETS

    update: dict = {"base_model_name_or_path": str(base) if base is not None else None}
    if multimodal:  # the released adapters' form: the decoder's linears only, not the towers'
        update["target_modules"] = PEFT_TARGETS
    return update


def run(spec: ToolSpec) -> int:
    from phi4core.interop.hf import ConversionError

    try:
        for kind, path in export(spec).items():
            print(f"exported {kind}: {path}", flush=True)
    except (fin.InputError, ConversionError) as e:
        log.error("cannot export stage %s: %s", spec.name, e)
        return exitcodes.BAD_SPEC
    return exitcodes.OK
