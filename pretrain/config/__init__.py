"""Run configuration: the command line (Megatron-LM's flags) -> one validated TrainConfig."""
