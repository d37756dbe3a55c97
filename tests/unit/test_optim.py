"""Parameter groups, frozen parameters, the warmup+cosine schedule and freeze-then-unfreeze.

Run: .venv/bin/pytest tests/unit/test_optim.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmer_dist.config import ConfigError, EncoderConfig, FusionConfig, ModelConfig, OptimConfig, replace
from mmer_dist.models import build_model
from helpers import example_batch
from mmer_dist.train.optim import (add_unfrozen_params, apply_freeze_schedule, build_optimizer, build_scheduler,
                                   param_groups)

OPT = OptimConfig(lr=1e-3, encoder_lr=2e-4, weight_decay=0.05, warmup_steps=2, min_lr_ratio=0.1)


def cfg(**changes) -> ModelConfig:
    base = ModelConfig(text=EncoderConfig(kind="hf", pretrained="", size="debug"), audio=EncoderConfig(kind="scratch"),
                       video=EncoderConfig(kind="scratch"), fusion=FusionConfig(width=32, layers=1, heads=2), num_classes=4)
    return replace(base, **changes)


def batch(seed: int = 0) -> dict:
    return example_batch(4, audio_samples=4000, frames=3, image_size=16, num_classes=4,
                         generator=torch.Generator().manual_seed(seed))


def step(model, optimizer, scheduler=None, seed: int = 0) -> None:
    b = batch(seed)
    optimizer.zero_grad()
    F.cross_entropy(model(b), b["labels"]).backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def test_group_lrs_and_weight_decay_as_configured():
    model = build_model(cfg())
    groups = param_groups(model, OPT)
    names = [g["name"] for g in groups]
    assert names == ["text/decay", "text/no_decay", "audio/decay", "audio/no_decay", "video/decay", "video/no_decay",
                     "fusion/decay", "fusion/no_decay"]
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_id) == sum(len(g["params"]) for g in groups) == len(named)  # each parameter exactly once
    for name, p in named.items():
        g = by_id[id(p)]
        assert g["lr"] == (OPT.encoder_lr if name.startswith("encoders.") else OPT.lr), name
        no_decay = p.ndim <= 1 or name in {"fusion.cls", "fusion.modality_embed", "fusion.pos_embed"}
        assert g["weight_decay"] == (0.0 if no_decay else OPT.weight_decay), name
    assert by_id[id(named["fusion.proj.text.1.bias"])]["weight_decay"] == 0.0
    optimizer = build_optimizer(model, OPT)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_frozen_parameters_get_no_grad_and_no_optimizer_state():
    model = build_model(cfg(text=EncoderConfig(kind="hf", pretrained="", size="debug", freeze=True)))
    optimizer = build_optimizer(model, OPT)
    text_params = list(model.encoders["text"].parameters())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for p in text_params)
    assert not any(g["name"].startswith("text/") for g in optimizer.param_groups)
    before = [p.detach().clone() for p in text_params]
    step(model, optimizer)
    assert all(p.grad is None for p in text_params)
    assert all(p not in optimizer.state for p in text_params)
    assert all(torch.equal(p, q) for p, q in zip(text_params, before))
    assert all(p in optimizer.state for p in model.fusion.parameters())


def test_audio_feature_extractor_frozen_by_option():
    model = build_model(cfg(audio=EncoderConfig(kind="hf", size="debug", freeze_feature_extractor=True)))
    fe = list(model.encoders["audio"].backbone.feature_extractor.parameters())
    held = {id(p) for g in param_groups(model, OPT) for p in g["params"]}
    assert fe and not any(id(p) in held for p in fe)
    assert any(id(p) in held for p in model.encoders["audio"].backbone.encoder.parameters())


def test_encoder_lr_zero_is_refused_for_trainable_encoders():
    with pytest.raises(ConfigError, match="freeze=true"):
        param_groups(build_model(cfg()), replace(OPT, encoder_lr=0.0))


def test_warmup_then_cosine():
    model = build_model(cfg(modalities=("text",)))
    optimizer = build_optimizer(model, OPT)
    total = 12
    scheduler = build_scheduler(optimizer, OPT, total)
    lrs = []
    for _ in range(total):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    fusion = [x["fusion/decay"] for x in lrs]
    text = [x["text/decay"] for x in lrs]
    assert fusion[0] == pytest.approx(OPT.lr / 3) and fusion[1] == pytest.approx(OPT.lr * 2 / 3)  # warmup 2 steps
    assert fusion[2] == pytest.approx(OPT.lr)  # peak
    span = total - 1 - 2
    for s in range(2, total):
        expected = OPT.min_lr_ratio + (1 - OPT.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * (s - 2) / span))
        assert fusion[s] == pytest.approx(OPT.lr * expected)
        assert text[s] == pytest.approx(OPT.encoder_lr * expected)
    assert fusion[-1] == pytest.approx(OPT.lr * OPT.min_lr_ratio)
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_scheduler(optimizer, OPT, 2)


def test_freeze_then_unfreeze_and_resume():
    model_cfg = cfg(text=EncoderConfig(kind="hf", pretrained="", size="debug", freeze=True, unfreeze_after_steps=3))
    torch.manual_seed(0)
    model = build_model(model_cfg)
    model.train()
    optimizer = build_optimizer(model, OPT)
    scheduler = build_scheduler(optimizer, OPT, 10)
    text_params = list(model.encoders["text"].parameters())
    added_at = None
    for s in range(6):
        if apply_freeze_schedule(model, model_cfg, s):
            names = add_unfrozen_params(optimizer, model, OPT, scheduler)
            assert names == ["text/decay", "text/no_decay"]
            added_at = s
            assert model.encoders["text"].training  # back in training mode with the rest of the model
            new = [g for g in optimizer.param_groups if g["name"].startswith("text/")]
            assert all(g["lr"] == pytest.approx(OPT.encoder_lr * scheduler.lr_lambdas[0](s)) for g in new)
        if s < 3:
            assert all(p not in optimizer.state for p in text_params)
        step(model, optimizer, scheduler, seed=s)
    assert added_at == 3 and not apply_freeze_schedule(model, model_cfg, 6)  # idempotent
    assert all(p in optimizer.state for p in text_params if p.grad is not None)
    assert len(scheduler.get_last_lr()) == len(optimizer.param_groups)
    # After step 5: the text groups follow the same curve as the rest, relative to encoder_lr.
    lam = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx((OPT.lr if g["name"].startswith("fusion/") else OPT.encoder_lr) * lam)

    # Resume: build as at step 0, replay the schedule for the resumed step, then load the states.
    # (deep copies, as a checkpoint on disk would be: state_dict() shares the moment tensors)
    saved_opt, saved_sched = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())
    resumed = build_model(model_cfg)
    resumed.load_state_dict(model.state_dict())
    resumed.train()
    opt2 = build_optimizer(resumed, OPT)
    sched2 = build_scheduler(opt2, OPT, 10)
    assert apply_freeze_schedule(resumed, model_cfg, 6)
    add_unfrozen_params(opt2, resumed, OPT, sched2)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert [g["name"] for g in opt2.param_groups] == [g["name"] for g in optimizer.param_groups]
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in optimizer.param_groups])
    for m, o, sc in ((model, optimizer, scheduler), (resumed, opt2, sched2)):
        torch.manual_seed(123)  # same dropout draws in both
        step(m, o, sc, seed=9)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, msg=lambda m: f"{name}: {m}")
