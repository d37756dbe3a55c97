"""Training: the Accelerate/DeepSpeed loop, optimiser and schedule, checkpoints, metrics.

Run with `python -m mmer_dist.train --config NAME [key=value ...]` or `mmer-dist train ...`.
"""
