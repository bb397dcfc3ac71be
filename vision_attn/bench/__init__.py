"""Benchmarks: ``python -m vision_attn.bench {attention,model,data}``. Ratios, side by side, one process."""
