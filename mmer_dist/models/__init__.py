"""Models: modality encoders, the cross-modal fusion transformer, heads and losses.

`build_model(cfg.model)` is the one entry point.

    from mmer_dist.models import build_model, build_loss
    model = build_model(cfg.model)                 # forward(batch) -> logits[B, num_classes]
    loss_fn = build_loss(cfg.loss, class_counts)   # loss_fn(logits, labels) -> scalar
    tokenizer = build_tokenizer(cfg.model.text)    # offline MiniLM vocabulary by default

Modules: encoders.py (Encoder base class, weight loading, tokenizer), text.py / audio.py / video.py
(the hf and scratch encoders of each modality), cached.py (features from `mmer-dist embed`),
registry.py ((modality, kind) -> builder, build_encoder), fusion.py (CrossModalFusion,
MultimodalModel, build_model), heads.py (ClassificationHead, losses, build_loss). Nothing here
imports mmer_dist.data: the models see batches, never shards.
"""

from mmer_dist.models.encoders import build_tokenizer
from mmer_dist.models.fusion import MultimodalModel, build_model
from mmer_dist.models.heads import build_loss
from mmer_dist.models.registry import build_encoder

__all__ = ["MultimodalModel", "build_encoder", "build_loss", "build_model", "build_tokenizer"]
