"""phi4core: the models, data and trainer of one stage (megatron-core); knows nothing of stages."""
