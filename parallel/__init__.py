"""The 5D parallel layout (TP with SP, PP with virtual stages, EP, CP, DP): validation, process
groups and the device runtime; `compat`: every patch of third-party code."""
