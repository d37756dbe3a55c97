"""Data: decode shard members, the per-rank pipeline and loaders, the distributed weighted sampler, collation."""
