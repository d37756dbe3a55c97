"""mmer_dist: multimodal emotion recognition (text + speech + face video) on MELD and RAVDESS.

Pack raw corpora into WebDataset shards, stream them to every rank with a distributed
weighted sampler, fine-tune encoders and a cross-modal transformer with Accelerate or
DeepSpeed, and evaluate with Macro-F1 as the headline. Importing the package has no side
effects; the command line is `mmer-dist` (see `mmer_dist.cli`).
"""

__version__ = "0.1.0"
