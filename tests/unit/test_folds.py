"""Speaker-independent folds: the rule (mmer_dist.folds), the same at pack and training time, leakage refused,
and a fold chosen at training time on a RAVDESS pack with `--split none`, through train and eval."""

from __future__ import annotations

import json

import pytest

from mmer_dist.config import ConfigError, DataConfig
from mmer_dist.corpora.ravdess import split_actors
from mmer_dist.data.folds import check_speaker_independence, fold_rows
from mmer_dist.folds import FoldError, speaker_folds
from mmer_dist.shards.schema import Samples, load_index

ACTORS = [f"Actor_{a:02d}" for a in range(1, 21)]


def test_twenty_actors_make_five_folds_of_four_disjoint_and_complete():
    tests = []
    for k in range(5):
        f = speaker_folds(ACTORS, 5, k, 2)
        assert len(f["test"]) == 4 and len(f["dev"]) == 2 and len(f["train"]) == 14
        assert not set(f["test"]) & set(f["dev"]) and not set(f["train"]) & (set(f["test"]) | set(f["dev"]))
        assert set(f["train"]) | set(f["dev"]) | set(f["test"]) == set(ACTORS)
        tests += f["test"]
    assert sorted(tests) == ACTORS                                      # every actor tested exactly once
    assert speaker_folds(ACTORS, 5, 0, 2)["dev"] == ["Actor_19", "Actor_20"]   # the two before, cyclically


def test_training_time_folds_equal_pack_time_folds():
    ints = list(range(1, 21))
    for k in range(5):
        pack_time = split_actors(ints, fold=f"fold{k}of5")
        now = speaker_folds(ints, 5, k, 2)
        for split in ("train", "dev", "test"):
            assert sorted(a for a, s in pack_time.items() if s == split) == sorted(now[split])


def test_impossible_folds_and_leakage_are_refused():
    with pytest.raises(FoldError, match="2..3 speaker-independent folds"):
        speaker_folds(ACTORS[:3], 4, 0, 1)
    with pytest.raises(FoldError, match="too few for data.dev_speakers=5"):
        speaker_folds(ACTORS[:6], 2, 0, 5)
    with pytest.raises(FoldError, match="1 speaker.*both dev and test.*Actor_04"):
        check_speaker_independence({"train": ACTORS[:2], "dev": ACTORS[2:4], "test": ACTORS[3:6]})
    with pytest.raises(ConfigError, match=r"data.fold=5 must be in 0..4"):
        DataConfig(folds=5, fold=5)


@pytest.fixture(scope="module")
def ravdess_all(tmp_path_factory):
    from mmer_dist.corpora.synthetic import write_corpus
    from mmer_dist.shards.pack import pack

    root = tmp_path_factory.mktemp("rav")
    write_corpus("ravdess", root / "raw", n=200, seed=0, video=False, n_actors=10)
    pack("ravdess", root / "raw", root / "shards", shard_samples=40, reader_options={"split": "none"},
         progress=False)
    return root / "shards"


def test_pack_split_none_keeps_every_actor_in_one_split(ravdess_all):
    index = load_index(ravdess_all)
    assert list(index.splits) == ["all"] and index.group_unit == "speaker"
    assert index.speakers == [f"Actor_{a:02d}" for a in range(1, 11)]
    cfg = DataConfig(folds=5, fold=2, dev_speakers=2)
    rows = {s: fold_rows(index, ravdess_all, cfg, s) for s in ("train", "dev", "test")}
    assert all(packed == "all" for packed, _ in rows.values())
    speakers = Samples(ravdess_all, "all", index.splits["all"].num_samples)["speaker"]
    names = {s: sorted({index.speakers[i] for i in speakers[r]}) for s, (_, r) in rows.items()}
    assert names == {k: sorted(v) for k, v in speaker_folds(index.speakers, 5, 2, 2).items()}
    assert sum(r.size for _, r in rows.values()) == index.splits["all"].num_samples


def test_a_fold_trains_and_evaluates_on_its_speakers(ravdess_all, tmp_path):
    from mmer_dist.cli import main as cli_main
    from mmer_dist.train.__main__ import main as train_main

    run = tmp_path / "run"
    assert train_main(["--config", "debug", "--shards", str(ravdess_all), "--out", str(run), "data.modalities=[audio]",
                       "data.folds=5", "data.fold=2", "train.max_steps=2", "optim.warmup_steps=1"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    proto = metrics["protocol"]
    assert proto["split_kind"] == "speaker_folds" and proto["overlap"] == {} and proto["unit"] == "speaker"
    assert proto["speakers"]["test"] == ["Actor_05", "Actor_06"] and proto["speakers"]["dev"] == ["Actor_03", "Actor_04"]
    assert metrics["split"] == metrics["selected_on"] == "dev" and metrics["n"] == 40   # 2 dev actors x 20
    assert cli_main(["eval", "--model", str(run), "--shards", str(ravdess_all), "--split", "test",
                     "--out", str(tmp_path / "test")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "test" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {r["speaker"] for r in rows} == {"Actor_05", "Actor_06"}
    assert {r["group"] for r in rows} == {5, 6}
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["selected_on"] == "dev"


def test_final_weights_record_no_selection(ravdess_all, tmp_path):
    """train.select=last keeps the final weights whatever dev said: no split was chosen on, so no summary
    flags its dev figures as optimistic."""
    from mmer_dist.cli import main as cli_main
    from mmer_dist.train.__main__ import main as train_main

    run = tmp_path / "run"
    assert train_main(["--config", "debug", "--shards", str(ravdess_all), "--out", str(run), "data.modalities=[audio]",
                       "data.folds=5", "data.fold=0", "train.max_steps=2", "optim.warmup_steps=1",
                       "train.select=last"]) == 0
    assert json.loads((run / "metrics.json").read_text())["selected_on"] is None
    assert cli_main(["eval", "--model", str(run), "--shards", str(ravdess_all), "--split", "test",
                     "--out", str(tmp_path / "test")]) == 0
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["selected_on"] is None
