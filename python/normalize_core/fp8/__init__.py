"""Per-block FP8 conversion.

The rule, layout, group, config, contract and convert modules need no torch; ``quantize`` (torch
tensors) imports it, and ``quantizers`` only for a GPU. Importing this package imports neither.
"""
