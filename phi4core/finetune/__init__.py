"""Fine-tuning's stages beyond training: evaluation (`kind: eval`) and export (`kind: export`),
each one process, each building its model from its inputs (phi4core.finetune.inputs)."""
