"""Model code (imports megatron-core: keep it out of the CLI's start-up path).

decoder     build_model / build_model_chunks / build_meta_model, PrecisionSettings, FP8 helpers,
            module groups for freezing
rope        LongRoPE as a megatron RotaryEmbedding
attention   SDPA core attention for the local (non-TE) layer spec
cpu_shims   every CPU workaround megatron needs, applied only without a GPU
"""
