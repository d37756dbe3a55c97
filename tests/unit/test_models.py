"""Models on CPU with debug sizes: missing modalities, masks, modality dropout, loading, learnability.

Run: .venv/bin/pytest tests/unit/test_models.py -q
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmer_dist.config import ConfigError, EncoderConfig, FusionConfig, ModelConfig, OptimConfig, replace
from mmer_dist.models import build_model, build_tokenizer
from mmer_dist.models.audio import spec_augment
from helpers import example_batch
from mmer_dist.models.encoders import EncoderLoadError
from mmer_dist.models.registry import build_encoder
from mmer_dist.models.fusion import pool_tokens
from mmer_dist.train.optim import build_optimizer

MODS = ("text", "audio", "video")
DEBUG_TEXT = EncoderConfig(kind="hf", pretrained="", size="debug")


def debug_cfg(**changes) -> ModelConfig:
    base = ModelConfig(text=DEBUG_TEXT, audio=EncoderConfig(kind="scratch"), video=EncoderConfig(kind="scratch"),
                       fusion=FusionConfig(width=32, layers=1, heads=2, max_tokens_per_modality=8), num_classes=5)
    return replace(base, **changes)


def hf_cfg(**changes) -> ModelConfig:
    return debug_cfg(audio=EncoderConfig(kind="hf", size="debug"), video=EncoderConfig(kind="hf", size="debug"), **changes)


def batch(b: int = 4, seed: int = 0, **kw) -> dict:
    kw = {"audio_samples": 8000, "frames": 4, "image_size": 32, "num_classes": 5, "text_len": 12, **kw}
    return example_batch(b, generator=torch.Generator().manual_seed(seed), **kw)


def drop(batch_: dict, modality: str, how: str) -> dict:
    """Make `modality` missing: 'mask' = all-False rows (zeros), 'absent' = keys removed."""
    out = dict(batch_)
    key, mkey = {"text": ("text_ids", "text_mask"), "audio": ("audio", "audio_mask"), "video": ("video", "video_mask")}[modality]
    if how == "absent":
        out.pop(key), out.pop(mkey)
    else:
        out[key], out[mkey] = torch.zeros_like(out[key]), torch.zeros_like(out[mkey])
    return out


def pad_batch(batch_: dict, text: int = 5, audio: int = 3000, frames: int = 3) -> dict:
    """Append padding (masked positions) to every modality."""
    out = dict(batch_)
    out["text_ids"], out["text_mask"] = F.pad(out["text_ids"], (0, text)), F.pad(out["text_mask"], (0, text))
    out["audio"], out["audio_mask"] = F.pad(out["audio"], (0, audio)), F.pad(out["audio_mask"], (0, audio))
    out["video"] = F.pad(out["video"], (0, 0, 0, 0, 0, 0, 0, frames))
    out["video_mask"] = F.pad(out["video_mask"], (0, frames))
    return out


@pytest.mark.parametrize("cfg_fn", [debug_cfg, hf_cfg], ids=["scratch", "hf"])
@pytest.mark.parametrize("present", [c for n in range(4) for c in itertools.combinations(MODS, n)],
                         ids=lambda c: "+".join(c) or "none")
def test_forward_backward_every_combination(cfg_fn, present):
    torch.manual_seed(0)
    model = build_model(cfg_fn())
    model.train()
    b = batch()
    for i, m in enumerate(m for m in MODS if m not in present):
        b = drop(b, m, "absent" if i % 2 else "mask")  # both ways a modality can be missing
    logits = model(b)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    F.cross_entropy(logits, b["labels"]).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    # Every parameter stays in the graph (DDP needs that) and no gradient is NaN.
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)


def test_per_sample_missing_modalities_are_finite_and_ignored():
    """Each sample a different subset (including none); a missing modality's values do not matter."""
    torch.manual_seed(0)
    model = build_model(debug_cfg()).eval()
    b = batch(8)
    subsets = [c for n in range(4) for c in itertools.combinations(MODS, n)]
    for i, present in enumerate(subsets):
        for m, (key, mkey) in {"text": ("text_ids", "text_mask"), "audio": ("audio", "audio_mask"),
                               "video": ("video", "video_mask")}.items():
            if m not in present:
                b[mkey][i] = False
    logits = model(b)
    assert torch.isfinite(logits).all()
    # Garbage in the masked-out slots changes nothing.
    noisy = dict(b)
    noisy["audio"] = torch.where(b["audio_mask"], b["audio"], torch.randn_like(b["audio"]) * 100)
    noisy["video"] = torch.where(b["video_mask"][..., None, None, None], b["video"], torch.randn_like(b["video"]) * 100)
    noisy["text_ids"] = torch.where(b["text_mask"], b["text_ids"], torch.randint_like(b["text_ids"], 1000, 2000))
    torch.testing.assert_close(model(noisy), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modality", MODS)
def test_absent_key_equals_all_masked(modality):
    torch.manual_seed(0)
    model = build_model(debug_cfg()).eval()
    b = batch()
    torch.testing.assert_close(model(drop(b, modality, "absent")), model(drop(b, modality, "mask")), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cfg_fn", [debug_cfg, hf_cfg], ids=["scratch", "hf"])
@pytest.mark.parametrize("pooling", ["tokens", "mean"])
def test_padding_changes_nothing(cfg_fn, pooling):
    torch.manual_seed(0)
    cfg = cfg_fn()
    cfg = replace(cfg, audio=replace(cfg.audio, pooling=pooling), video=replace(cfg.video, pooling=pooling))
    model = build_model(cfg).eval()
    b = batch(4, audio_samples=12000)
    with torch.no_grad():
        ref, padded = model(b), model(pad_batch(b))
        changed = dict(b)
        changed["audio"] = b["audio"].flip(1) * b["audio_mask"]
        other = model(changed)
    torch.testing.assert_close(padded, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(other, ref, atol=1e-4)  # the check is sensitive: real audio does matter


def test_group_norm_audio_and_per_frame_image_models_from_local_folders(tmp_path):
    """A local `save_pretrained` folder loads; group-norm wav2vec2 runs per utterance (padding-exact);
    a ViT video model runs per frame with the frame mask."""
    from transformers import ViTConfig, ViTModel, Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 conv_dim=(32, 32), conv_kernel=(10, 8), conv_stride=(5, 4), feat_extract_norm="group",
                                 num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)).save_pretrained(tmp_path / "w2v")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(tmp_path / "vit")
    cfg = debug_cfg(audio=EncoderConfig(kind="hf", pretrained=str(tmp_path / "w2v")),
                    video=EncoderConfig(kind="hf", pretrained=str(tmp_path / "vit")))
    model = build_model(cfg).eval()
    assert model.encoders["audio"].per_utterance and not model.encoders["video"].clip_model
    assert model.encoders["audio"].describe()["source"] == str(tmp_path / "w2v")
    b = batch(3)
    tokens, mask = model.encoders["video"](b)
    assert tokens.shape[:2] == mask.shape and torch.equal(mask, b["video_mask"])
    with torch.no_grad():
        torch.testing.assert_close(model(pad_batch(b)), model(b), atol=2e-5, rtol=1e-4)


def test_audio_frame_mask_follows_sample_mask():
    enc = build_encoder("audio", EncoderConfig(kind="hf", size="debug")).eval()
    b = batch(4, audio_samples=16000)
    tokens, mask = enc(b)
    lengths = b["audio_mask"].sum(1)
    expected = enc.backbone._get_feat_extract_output_lengths(lengths)
    assert torch.equal(mask.sum(1), expected) and tokens.shape[:2] == mask.shape
    scratch = build_encoder("audio", EncoderConfig(kind="scratch")).eval()
    tokens, mask = scratch(b)
    frames = (lengths - 400) // 160 + 1
    assert torch.equal(mask.sum(1), (((frames - 1) // 2 + 1) - 1) // 2 + 1)  # 10 ms frames, two stride-2 convs


def test_spec_augment_masks_only_inside_real_frames():
    torch.manual_seed(0)
    feats = torch.randn(64, 32, 50) + 10.0       # no feature is 0 before masking
    frames = torch.randint(0, 51, (64,))
    out = spec_augment(feats, frames, masks=2, max_bands=4, max_frames=6)
    hidden = out == 0
    bands = hidden.all(dim=2)                    # whole mel bands masked
    steps = hidden.all(dim=1)                    # whole frames masked
    assert torch.equal(hidden, bands[:, :, None] | steps[:, None, :])  # nothing but bands and spans
    assert int(bands.sum(1).max()) <= 8 and bands.any()
    for row, n in enumerate(frames.tolist()):
        assert int(steps[row].sum()) <= 12 and not steps[row, n:].any()  # padding frames never chosen
    assert steps.any()


def test_scratch_audio_spec_augment_only_in_training():
    enc = build_encoder("audio", EncoderConfig(kind="scratch", spec_augment=True, dropout=0.0))
    b = batch(4, audio_samples=16000)
    enc.eval()
    with torch.no_grad():
        first, mask = enc(b)
        torch.testing.assert_close(enc(b)[0], first)
        enc.train()
        torch.manual_seed(1)
        augmented, _ = enc(b)
    assert not torch.allclose(augmented[mask], first[mask])


def test_pool_tokens_respects_mask():
    tokens = torch.arange(1.0, 11.0)[None, :, None].repeat(2, 1, 1)  # values 1..10
    mask = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    out, m = pool_tokens(tokens, mask, 4)
    # 10 real tokens -> bins of sizes 3,2,3,2: means 2, 4.5, 7, 9.5; 3 real tokens stay as they are.
    torch.testing.assert_close(out[0, :, 0], torch.tensor([2.0, 4.5, 7.0, 9.5]))
    torch.testing.assert_close(out[1, :3, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert m.tolist() == [[True] * 4, [True] * 3 + [False]]


def test_modality_dropout_off_at_eval_and_never_drops_all():
    torch.manual_seed(0)
    cfg = debug_cfg(fusion=FusionConfig(width=32, layers=1, heads=2, dropout=0.0, modality_dropout=0.9))
    model = build_model(cfg)
    reference = build_model(debug_cfg(fusion=replace(cfg.fusion, modality_dropout=0.0)))
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(b), reference(b))
        model.train()
        reference.train()
        for enc in list(model.encoders.values()) + list(reference.encoders.values()):
            enc.eval()  # isolate the fusion: only modality dropout can differ
        differs = any(not torch.allclose(model(b), reference(b)) for _ in range(5))
    assert differs, "modality_dropout=0.9 never changed a training forward pass"
    present = torch.rand(1000, 3) < 0.6
    keep = model.fusion.modality_dropout_mask(present)
    assert not (keep & ~present).any()
    assert torch.equal(keep.any(1), present.any(1))
    assert keep.sum() < present.sum()


def test_frozen_encoder_is_deterministic_in_train_mode():
    model = build_model(debug_cfg(audio=EncoderConfig(kind="scratch", freeze=True)))
    model.train()
    assert not model.encoders["audio"].training and model.encoders["text"].training
    b = batch()
    t1, _ = model.encoders["audio"](b)
    t2, _ = model.encoders["audio"](b)
    assert torch.equal(t1, t2) and not t1.requires_grad


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model(debug_cfg(fusion=FusionConfig(width=32, layers=1, heads=2, dropout=0.0)))
    ck_cfg = debug_cfg(text=replace(DEBUG_TEXT, gradient_checkpointing=True),
                       audio=EncoderConfig(kind="scratch", gradient_checkpointing=True),
                       fusion=FusionConfig(width=32, layers=1, heads=2, dropout=0.0))
    ck = build_model(ck_cfg)
    ck.load_state_dict(plain.state_dict())
    for m in (plain, ck):
        m.train()
        for mod in m.modules():  # no dropout anywhere, so both passes are deterministic
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
            if isinstance(mod, torch.nn.MultiheadAttention):
                mod.dropout = 0.0
        m.encoders["text"].backbone.config.hidden_dropout_prob = 0.0
    b = batch()
    for m in (plain, ck):
        F.cross_entropy(m(b), b["labels"]).backward()
    for (name, p), q in zip(plain.named_parameters(), ck.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_unloadable_pretrained_gives_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderLoadError) as info:
        build_encoder("audio", EncoderConfig(kind="hf", pretrained="facebook/wav2vec2-base"))
    msg = str(info.value)
    assert "model.audio.pretrained='facebook/wav2vec2-base'" in msg and "hf download" in msg
    assert "HF_HUB_OFFLINE" in msg  # and no chained stack of hub errors:
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    with pytest.raises(EncoderLoadError, match="/nonexistent/model"):
        build_encoder("text", EncoderConfig(kind="hf", pretrained="/nonexistent/model"))


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="kind=hf"):
        build_encoder("audio", EncoderConfig(kind="scratch", pretrained="facebook/wav2vec2-base"))
    with pytest.raises(ConfigError, match="freeze=true"):
        EncoderConfig(unfreeze_after_steps=5)
    with pytest.raises(ConfigError, match="model.audio.kind=scratch"):
        debug_cfg(audio=EncoderConfig(kind="hf", size="debug", spec_augment=True))
    with pytest.raises(ConfigError, match="set model.audio.spec_augment"):
        debug_cfg(video=EncoderConfig(kind="scratch", spec_augment=True))


def test_minilm_loads_offline_and_one_step_changes_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text_cfg = EncoderConfig(kind="hf", pretrained="", size="small")
    model = build_model(debug_cfg(text=text_cfg, modalities=("text",)))
    backbone = model.encoders["text"].backbone
    assert backbone.config.hidden_size == 384 and backbone.config.num_hidden_layers == 6
    tok = build_tokenizer(text_cfg)
    assert tok.vocab_size == build_encoder("text", DEBUG_TEXT).backbone.config.vocab_size
    enc = tok(["I can't believe you did that!", "Okay."], padding=True, return_tensors="pt")
    b = {"labels": torch.tensor([0, 1]), "text_ids": enc["input_ids"], "text_mask": enc["attention_mask"].bool()}
    model.train()
    weight = backbone.encoder.layer[0].attention.self.query.weight
    before = weight.detach().clone()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, encoder_lr=1e-4))
    F.cross_entropy(model(b), b["labels"]).backward()
    opt.step()
    assert not torch.equal(weight.detach(), before)
    # Real weights, not random: the two sentences' mean embeddings are those of a trained model.
    model.eval()
    tokens, mask = model.encoders["text"](b)
    assert tokens.shape[-1] == 384 and torch.isfinite(tokens).all()


def overfit_batch(n: int = 16, classes: int = 4, seed: int = 0) -> dict:
    """n samples whose every modality carries a label-dependent signal."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    ids = torch.randint(1000, 2000, (n, 10), generator=g)
    ids[:, 1] = 3000 + labels
    t = torch.arange(4000) / 16000
    audio = torch.sin(2 * math.pi * 200 * (labels[:, None] + 1) * t) * 0.5 + 0.05 * torch.randn(n, 4000, generator=g)
    video = torch.randn(n, 3, 3, 16, 16, generator=g) * 0.5
    video[torch.arange(n), :, labels % 3] += torch.where(labels < 3, 2.0, -2.0)[:, None, None, None]
    return {"labels": labels, "text_ids": ids, "text_mask": torch.ones(n, 10, dtype=torch.bool),
            "audio": audio, "audio_mask": torch.ones(n, 4000, dtype=torch.bool),
            "video": video, "video_mask": torch.ones(n, 3, dtype=torch.bool)}


@pytest.mark.parametrize("modalities", [MODS, ("text",), ("audio",), ("video",)], ids="+".join)
def test_tiny_model_overfits_16_samples(modalities):
    """End to end learnable, and through each encoder alone (the signal must pass through it)."""
    torch.manual_seed(0)
    model = build_model(debug_cfg(num_classes=4, modalities=modalities,
                                  fusion=FusionConfig(width=32, layers=1, heads=2, dropout=0.0)))
    opt = build_optimizer(model, OptimConfig(lr=3e-3, encoder_lr=3e-3, weight_decay=0.0))
    b = overfit_batch()
    accuracy, steps = 0.0, 0
    for steps in range(1, 201):
        model.train()
        loss = F.cross_entropy(model(b), b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if steps % 10 == 0:
            model.eval()
            with torch.no_grad():
                accuracy = (model(b).argmax(-1) == b["labels"]).float().mean().item()
            if accuracy == 1.0:
                break
    assert accuracy == 1.0, f"accuracy {accuracy:.2f} after {steps} steps (loss {loss.item():.3f})"


@pytest.mark.parametrize("cfg_fn", [debug_cfg, hf_cfg], ids=["scratch", "hf"])
def test_dtype_clean_under_bf16_autocast_and_bf16_weights(cfg_fn):
    """fp32 batches work with bf16 autocast (Accelerate) and with bf16-cast weights (DeepSpeed bf16)."""
    torch.manual_seed(0)
    model = build_model(cfg_fn())
    b = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(b)
    F.cross_entropy(logits.float(), b["labels"]).backward()
    assert torch.isfinite(logits.float()).all()
    model = model.to(torch.bfloat16)
    logits = model(b)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    F.cross_entropy(logits.float(), b["labels"]).backward()
