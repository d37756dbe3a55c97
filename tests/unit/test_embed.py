"""Embedding cache: decode/collate of KEY.emb.*.npy, the cached encoder, the source check, and
`embed` in-process (layout = input, deterministic bytes, resume, refusals, features = the frozen
encoders' on media, inspect)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmer_dist.config import ConfigError, EncoderConfig, replace
from mmer_dist.presets import load_config
from mmer_dist.data.collate import Collator
from mmer_dist.data.decode import DecodeError, decode_embedding, decode_sample, embedding_ext
from mmer_dist.embed import EmbedError, embed
from mmer_dist.models.cached import CachedEncoder, check_embeddings, source_config
from mmer_dist.shards.schema import Samples, load_index

ALL = ["data.modalities=[text,audio,video]", "data.max_audio_seconds=10.0"]
CACHED = ["model.text.kind=cached", "model.text.pretrained=", "model.text.size=debug", "model.text.pooling=mean",
          "model.audio.kind=cached", "model.audio.pretrained=scratch", "model.audio.size=debug",
          "model.video.kind=cached", "model.video.pretrained=scratch", "model.video.size=debug"]


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def emb_shards(synth_meld_shards: Path, tmp_path_factory) -> Path:
    """The session's synthetic media shards embedded with the debug encoders (text mean-pooled)."""
    out = tmp_path_factory.mktemp("emb") / "debug"
    cfg = load_config("debug", [*ALL, *CACHED])
    res = embed(cfg, synth_meld_shards, out, progress=False)
    assert res.index is not None and not res.dropped
    return out


# --------------------------------------------------------------------------- decode / collate


def test_decode_embedding_shapes_and_corruption():
    vec = np.arange(4, dtype=np.float16)
    assert decode_embedding(_npy(vec)).shape == (1, 4)
    assert decode_embedding(_npy(np.zeros((3, 4), np.float16))).shape == (3, 4)
    for bad in (b"not npy", _npy(np.zeros((2, 2, 2), np.float16)), _npy(np.zeros(3, np.int64))):
        with pytest.raises(DecodeError) as e:
            decode_embedding(bad, key="k1", modality="text")
        assert e.value.reason == "embedding_corrupt" and "k1.emb.text.npy" in e.value.detail


def test_embedding_sample_decodes_to_features_and_collates_with_masks():
    cfg = load_config("debug", ["data.modalities=[text,audio]"]).data
    meta = json.dumps({"label_id": 2}).encode()
    a = decode_sample({"__key__": "a", "json": meta, embedding_ext("text"): _npy(np.ones(4, np.float16)),
                       embedding_ext("audio"): _npy(np.ones((3, 4), np.float16))}, cfg, None, False, None)
    b = decode_sample({"__key__": "b", "json": meta, embedding_ext("text"): _npy(np.full(4, 2, np.float16))},
                      cfg, None, False, None)
    assert a["label"] == 2 and a["text_emb"].shape == (1, 4) and a["audio_emb"].shape == (3, 4)
    assert b["audio_emb"] is None and "text_ids" not in a and "audio" not in a
    batch = Collator(cfg)([a, b])
    assert set(batch) >= {"text_emb", "text_emb_mask", "audio_emb", "audio_emb_mask"}
    assert "text_ids" not in batch and "audio" not in batch
    assert batch["audio_emb"].shape == (2, 3, 4) and batch["audio_emb"].dtype == torch.float32
    assert batch["audio_emb_mask"].tolist() == [[True] * 3, [False] * 3]
    assert batch["text_emb"][1, 0].tolist() == [2.0] * 4


# --------------------------------------------------------------------------- cached encoder + check


def test_cached_encoder_width_forward_stub_and_media_refusal():
    assert CachedEncoder("text", EncoderConfig(kind="cached", pretrained="minilm")).out_dim == 384
    assert CachedEncoder("text", EncoderConfig(kind="cached", size="debug")).out_dim == 32
    assert CachedEncoder("audio", EncoderConfig(kind="cached", pretrained="scratch", size="small")).out_dim == 128
    enc = CachedEncoder("text", EncoderConfig(kind="cached", pooling="mean", dim=8))
    x = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    tokens, m = enc({"text_emb": x, "text_emb_mask": mask})
    assert torch.allclose(tokens[0, 0], x[0, :2].mean(0)) and m.tolist() == [[True], [False]]
    assert list(enc.parameters()) == []
    tokens, m = enc({"labels": torch.zeros(3, dtype=torch.long)}, batch_size=3)   # modality absent
    assert tokens.shape == (3, 1, 8) and not m.any()
    with pytest.raises(ValueError, match="were not made by `mmer-dist embed`"):
        enc({"text_ids": torch.ones(2, 4, dtype=torch.long), "text_mask": torch.ones(2, 4, dtype=torch.bool)})


def test_source_config_names_the_encoder_embed_runs():
    assert source_config("text", EncoderConfig(kind="cached", pretrained="minilm", pooling="mean")) == \
        EncoderConfig(kind="hf", pretrained="minilm", pooling="mean", freeze=True)
    assert source_config("audio", EncoderConfig(kind="cached", pretrained="scratch")).kind == "scratch"
    with pytest.raises(ConfigError, match="no from-scratch text encoder"):
        source_config("text", EncoderConfig(kind="cached", pretrained="scratch"))


def test_check_embeddings_refuses_with_both_encoders_named(emb_shards: Path, synth_meld_shards: Path):
    index = load_index(emb_shards)
    ok = load_config("debug", [*ALL, *CACHED])
    check_embeddings(index.extra, ok.model, ok.data.modalities, emb_shards)          # accepted
    wrong = load_config("debug", [*ALL, *CACHED, "model.text.pretrained=minilm"])
    with pytest.raises(ConfigError) as e:
        check_embeddings(index.extra, wrong.model, wrong.data.modalities, emb_shards)
    msg = str(e.value)
    assert "expects features from minilm" in msg and "random-init hf" in msg and "differ in pretrained" in msg
    pooled = load_config("debug", [*ALL, *CACHED, "model.text.pooling=tokens"])
    with pytest.raises(ConfigError, match="differ in pooling"):
        check_embeddings(index.extra, pooled.model, pooled.data.modalities, emb_shards)
    with pytest.raises(ConfigError, match="holds media shards"):
        check_embeddings(load_index(synth_meld_shards).extra, ok.model, ok.data.modalities, synth_meld_shards)
    media = load_config("debug", ALL)
    with pytest.raises(ConfigError, match="model.text.kind=cached model.text.pretrained="):
        check_embeddings(index.extra, media.model, media.data.modalities, emb_shards)


# --------------------------------------------------------------------------- embed in-process


def test_embed_keeps_keys_labels_and_split_layout(emb_shards: Path, synth_meld_shards: Path):
    src, out = load_index(synth_meld_shards), load_index(emb_shards)
    assert out.profile == "embeddings" and out.labels == src.labels
    for split, si in src.splits.items():
        so = out.splits[split]
        assert so.shards == si.shards and so.sizes == si.sizes
        assert so.shard_classes == si.shard_classes and so.class_counts == si.class_counts
        a, b = Samples(synth_meld_shards, split, si.num_samples), Samples(emb_shards, split, so.num_samples)
        for col in ("label", "speaker", "group", "duration"):
            assert np.array_equal(a[col], b[col]), col
    assert out.speakers == src.speakers and out.group_unit == src.group_unit
    rec = out.extra["embeddings"]
    assert rec["text"]["stored"] == "vector" and rec["audio"]["stored"] == "tokens"
    assert rec["text"]["pretrained"] == "" and rec["audio"]["pretrained"] == "scratch"
    assert all(len(r["weights_sha256"]) == 64 and r["dtype"] == "float16" for r in rec.values())
    import tarfile

    with tarfile.open(emb_shards / out.splits["dev"].shards[0]) as tf:
        names = tf.getnames()
        key = names[0].split(".")[0]
        assert f"{key}.json" in names and f"{key}.emb.text.npy" in names
        text = np.load(io.BytesIO(tf.extractfile(f"{key}.emb.text.npy").read()))
        assert text.dtype == np.float16 and text.shape == (32,)
        with tarfile.open(synth_meld_shards / out.splits["dev"].shards[0]) as src_tf:
            assert tf.extractfile(f"{key}.json").read() == src_tf.extractfile(f"{key}.json").read()


def test_embed_is_deterministic_and_resumes_after_damage(emb_shards: Path, synth_meld_shards: Path, tmp_path: Path):
    out = tmp_path / "again"
    cfg = load_config("debug", [*ALL, *CACHED])
    embed(cfg, synth_meld_shards, out, progress=False)
    assert _files(out) == _files(emb_shards)
    # a "killed" run: index gone, a shard without stats (renamed, then killed), a temp file, a truncated tar
    index = load_index(out)
    names = [s for si in index.splits.values() for s in si.shards]
    (out / "index.json").unlink()
    (out / names[1].replace(".tar", ".stats.json")).unlink()
    (out / names[2].replace(".tar", ".stats.json")).unlink()
    (out / names[2]).write_bytes(b"truncated")
    (out / f".{names[3]}.tmp999").write_bytes(b"partial")
    res = embed(cfg, synth_meld_shards, out, progress=False)
    assert sorted(res.written) == sorted([names[1], names[2]]) and res.resumed == len(names) - 2
    assert _files(out) == _files(emb_shards)
    assert not list(out.glob(".*tmp*"))


def test_embed_refuses_other_settings_and_embedding_input(emb_shards: Path, synth_meld_shards: Path):
    other = load_config("debug", [*ALL, *CACHED, "model.text.pooling=tokens"])
    with pytest.raises(EmbedError, match="other settings"):
        embed(other, synth_meld_shards, emb_shards, progress=False)
    with pytest.raises(EmbedError, match="already holds embeddings"):
        embed(other, emb_shards, emb_shards.parent / "x", progress=False)


def test_embed_of_a_modality_the_shards_lack_is_refused(tmp_path: Path, synth_meld_shards: Path):
    idx = json.loads((synth_meld_shards / "index.json").read_text())
    fake = tmp_path / "textonly"
    fake.mkdir()
    for si in idx["splits"].values():
        si["modalities"] = {"text": si["modalities"]["text"]}
    (fake / "index.json").write_text(json.dumps(idx))
    with pytest.raises(EmbedError, match=r"holds no audio, video .*data.modalities=\[text\]"):
        embed(load_config("debug", ALL), fake, tmp_path / "out", progress=False)


def test_cached_features_and_logits_equal_the_frozen_model_on_media(emb_shards: Path, synth_meld_shards: Path):
    """Same seed, same encoders: the fusion sees the media model's features up to fp16 rounding."""
    from mmer_dist.data.build import build_eval_loader
    from mmer_dist.models import build_model, build_tokenizer

    media_cfg = load_config("debug", [*ALL, "model.text.pooling=mean", "model.fusion.dropout=0.0"])
    cached_cfg = load_config("debug", [*ALL, *CACHED, "model.fusion.dropout=0.0"])
    mcfg = replace(media_cfg.model, num_classes=7)
    torch.manual_seed(media_cfg.train.seed)                  # as `mmer-dist train` and `embed` do
    media = build_model(replace(mcfg, **{m: replace(getattr(mcfg, m), freeze=True) for m in ("text", "audio", "video")}))
    cached = build_model(replace(cached_cfg.model, num_classes=7))
    missing, unexpected = cached.load_state_dict({k: v for k, v in media.state_dict().items()
                                                  if not k.startswith("encoders.")}, strict=False)
    assert not missing and not unexpected
    media.eval(), cached.eval()
    tok = build_tokenizer(media_cfg.model.text)
    media_loader = build_eval_loader(synth_meld_shards, media_cfg.data, tok, split="dev")
    emb_loader = build_eval_loader(emb_shards, cached_cfg.data, build_tokenizer(cached_cfg.model.text), split="dev")
    n = 0
    with torch.no_grad():
        for mb, eb in zip(media_loader, emb_loader):
            assert mb["keys"] == eb["keys"]
            feats_m, feats_c = media.encode(mb), cached.encode(eb)
            for m in ("text", "audio", "video"):
                (tm, mm), (tc, mc) = feats_m[m], feats_c[m]
                assert torch.equal(mm.any(1), mc.any(1)), m
                assert torch.allclose(tm[:, : tc.shape[1]], tc, atol=2e-2, rtol=2e-3), m
            logits_m, logits_c = media(mb), cached(eb)
            assert torch.allclose(logits_m, logits_c, atol=2e-3), (logits_m - logits_c).abs().max()
            n += len(mb["keys"])
    assert n == load_index(emb_shards).splits["dev"].num_samples


def test_inspect_works_on_embedding_shards(emb_shards: Path, synth_meld_shards: Path, tmp_path: Path):
    from mmer_dist.shards.inspect import plot_classes, summarize

    s, m = summarize(emb_shards), summarize(synth_meld_shards)
    assert s["complete"] and s["profile"] == "embeddings"
    for split in m["splits"]:
        assert s["splits"][split]["classes"] == m["splits"][split]["classes"]
        assert s["splits"][split]["imbalance_ratio"] == m["splits"][split]["imbalance_ratio"]
        assert set(s["splits"][split]["modalities"]) == {"text", "audio", "video"}
    paths = plot_classes(s, tmp_path / "plots")
    assert sorted(p.name for p in paths) == sorted(f"{k}_classes.png" for k in m["splits"])
    assert all(p.stat().st_size > 1000 for p in paths)


def test_embed_reads_its_input_from_a_url_and_drops_the_copies(emb_shards: Path, http_shards: str, tmp_path: Path):
    import os

    out = tmp_path / "from-http"
    res = embed(load_config("debug", [*ALL, *CACHED]), http_shards, out, progress=False)
    tars = {k: v for k, v in _files(out).items() if k.endswith((".tar", ".stats.json"))}
    assert tars and tars == {k: v for k, v in _files(emb_shards).items() if k.endswith((".tar", ".stats.json"))}
    assert res.index is not None and res.index.extra["input"] == http_shards
    assert not list(Path(os.environ["MMER_CACHE"]).rglob("*.tar"))          # the node copies are deleted
