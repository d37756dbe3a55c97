"""Shards: pack raw utterances into WebDataset tars with an index (`schema` is shared with readers)."""
