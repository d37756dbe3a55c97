"""Models: modality encoders, the cross-modal fusion transformer, heads and losses.

`build_model(cfg.model)` is the one entry point.
"""
