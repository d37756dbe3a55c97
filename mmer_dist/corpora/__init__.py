"""Corpus readers: each turns a raw corpus on disk into `Utterance` records.

    from mmer_dist.corpora import read_corpus
    utterances, report = read_corpus("meld", root)
"""
