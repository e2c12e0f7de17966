"""What a run reports: the metrics sink (stdout, TensorBoard, W&B), timers, memory, norms, MoE
routing statistics, the profiler and the expert-load picture."""
