"""Per-block FP8 conversion.

The rule, layout, config and contract modules need no torch; ``quantize`` and ``convert`` import
it. Importing this package imports neither.
"""
