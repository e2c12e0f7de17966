"""Faults (non-finite steps, spikes, timeouts, injection) and stopping on a signal."""
