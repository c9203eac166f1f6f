"""The training engine: one stage, from a StageSpec, on one CPU or many GPUs."""
