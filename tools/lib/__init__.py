"""Helpers shared by the tools and their tests: recipe files, the HF export check."""
