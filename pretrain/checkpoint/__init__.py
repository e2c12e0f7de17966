"""Checkpoints: distributed save/load (dist_checkpointing), what a checkpoint records, integrity
checks, format upgrades, Megatron-Bridge's layout and what a tool may overwrite."""
