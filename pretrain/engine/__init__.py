"""The data-parallel engine: DDP + optimizer (megatron-core's or DeepSpeed's), Muon, optimizer state
across layouts."""
