"""Model code (imports megatron-core: keep it out of the CLI's start-up path).

decoder     build_model / build_model_chunks / build_meta_model (precision: config.Precision),
            FP8 helpers, module groups for freezing (names from phi4core.module_groups)
lora        the Mixture of LoRAs: TP-aware adapters on qkv/o/fc1/fc2, routing by input_mode,
            merge (saving and loading: phi4core.interop.lora_adapters)
multimodal  MultimodalModel: the decoder with its LoRAs and pluggable towers, placeholder
            assembly, zero-weighted gradients for idle trainable modules
chunks      a model as one module or virtual-pipeline chunks: as_chunks, unwrap
rope        LongRoPE as a megatron RotaryEmbedding
attention   SDPA core attention for the local (non-TE) layer spec
vision      the SigLIP image tower (megatron layers), separators, projector; num_image_tokens
hd_transform  the image processor's HD transform and token count (torch only)
audio       the speech tower: normalisation, subsampling, conformer blocks, chunking, the two
            projectors; num_audio_tokens
audio_features  the feature extractor's log-Mel features (torch only)
conformer   subsampling, relative bias and conformer block modules
tower_common  megatron config defaults and helpers the towers share
cpu_shims   every CPU workaround megatron needs, applied only without a GPU (by
            phi4core.runtime.init and phi4core.parallel.init_distributed, never at import)
"""
