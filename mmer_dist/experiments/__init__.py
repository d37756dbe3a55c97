"""Experiments you can trust: repeated runs (sweeps), their summaries with intervals, paired significance.

    mmer-dist sweep --config debug --shards S --out SWEEP --seeds 0,1,2    # sweep.py: seeds x folds x overrides
    mmer-dist summarize SWEEP                                              # summary.py: mean, std, 95% CI, ensemble
    mmer-dist compare A B --json                                           # compare.py: paired bootstrap

stats.py holds the statistics (numpy + scipy.stats, no torch); predictions.py reads the per-sample
predictions the evaluations write and knows each corpus's independent unit (MELD dialogue, RAVDESS actor).
"""
