"""GLM-5 on megatron-core: config, presets, layer specs and the modules megatron-core lacks."""
