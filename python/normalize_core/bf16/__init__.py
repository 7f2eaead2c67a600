"""Block FP8 back to bf16 (``normalize to-bf16``).

``formats`` recognises the scale forms and pairs weights with scales, ``convert`` plans and writes,
``dequantizers`` chooses the Rust kernel (CPU) or torch (GPU); none of them imports torch unless a
GPU is used. ``dequantize`` (torch tensors) imports it. Importing this package imports neither.
"""
