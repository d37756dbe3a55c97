"""Configuration: one frozen dataclass per component, composed into `Config`.

A run's config is built in three layers, later layers winning (mmer_dist.presets does it):

1. the defaults below (what `mmer-dist train --dump-config` prints with no preset);
2. a YAML preset from `mmer_dist/configs/NAME.yaml` (or any YAML path) holding only the
   differences from the defaults; a preset may name another with `base: NAME`;
3. dotted overrides from the command line: `optim.lr=3e-4 data.modalities=[text]`.

Every component receives only its own sub-config (`build_model(cfg.model)`, ...). Values are
validated in `__post_init__` with messages that say what to change.

    cfg = replace(Config(), optim=replace(OptimConfig(), lr=1e-3))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


from mmer_dist.weighting import SCHEMES

MODALITIES = ("text", "audio", "video")
LOSSES = ("ce", "weighted_ce", "focal", "class_balanced", "logit_adjusted")
"""Training losses (mmer_dist.models.heads.build_loss builds each)."""


class ConfigError(ValueError):
    """A configuration value or key that cannot work; the message says what to change."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SamplerConfig:
    """How training samples are drawn: the class-imbalance knob on the data side."""

    weighting: str = "none"
    """none (uniform shuffle, the baseline) | inverse | sqrt_inverse | effective_number | manual."""
    beta: float = 0.999
    """Effective-number beta (Cui et al. 2019), used when weighting=effective_number."""
    class_weights: dict[str, float] = field(default_factory=dict)
    """Per-class weights by label name, used when weighting=manual."""
    replacement: bool = True
    """Draw with replacement (needed for real oversampling of minority classes)."""
    seed: int = 0
    """Seed of the global draw; every rank derives the same draw from (seed, epoch)."""

    def __post_init__(self) -> None:
        _check_choice("sampler.weighting", self.weighting, SCHEMES)
        _check(0.0 < self.beta < 1.0, f"sampler.beta={self.beta} must be in (0, 1), e.g. 0.999")
        _check(self.weighting != "manual" or bool(self.class_weights),
               "sampler.weighting=manual needs sampler.class_weights={neutral: 1.0, fear: 5.0, ...}")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how samples are decoded and batched."""

    shards: str = "shards/out/synthetic-meld"
    """Folder written by `mmer-dist pack` (or `embed`), or its URL: s3://, gs://, http(s)://, file://, or
    `pipe:CMD` with {shard} for the file name (README, "Shards by URL"). URLs are read by streaming
    (data.loader=stream); credentials come from the storage library's environment and files, never from here."""
    cache_dir: str = ""
    """Node-local folder for the copy of a URL's compact index (fetched once per node, keyed by index.json's
    sha256); "" = $MMER_CACHE, else ~/.cache/mmer_dist."""
    read_retries: int = 8
    """Attempts per read of a file behind a URL (transient errors, backoff 0.5 s doubling up to 16 s); then the
    run stops with a DataError naming the URL."""
    read_timeout_s: float = 60.0
    """Connect and socket-read timeout of URL reads: a server that stops answering costs a retry, not a hang."""
    modalities: tuple[str, ...] = ("text", "audio", "video")
    """Modalities fed to the model; the others are ignored even when the shards hold them."""
    train_split: str = "train"
    eval_split: str = "dev"
    """Split used for periodic evaluation, best-checkpoint selection and the final metrics.json."""
    batch_size: int = 16
    """Per-rank batch size (global batch = batch_size x world size x grad_accum); with data.global_batch_size,
    the largest per-rank micro-batch."""
    global_batch_size: int = 0
    """0: data.batch_size is per rank. G > 0: samples per optimizer step whatever the number of processes R:
    the per-rank micro-batch b <= data.batch_size and train.grad_accum are derived (G = R x b x accum), so a
    preset means the same optimisation on 1, 2 or 64 processes; refused when G does not divide over R."""
    eval_batch_size: int = 32
    num_workers: int = 0
    """DataLoader worker processes per rank (decoding runs in them)."""
    loader_timeout_s: float = 300.0
    """With num_workers > 0: a worker that delivers no batch for this long (stalled, out of file handles for
    shared memory, ...) ends the run with its error and what it was reading, instead of a hang."""
    loader: str = "map"
    """map: random access into the tars via the index (exact weighted sampler, mid-epoch resume; local
    folders only); stream: WebDataset streaming with resampled shards and a fixed epoch length (any URL);
    evaluation streams too with stream or a URL."""
    steps_per_epoch: int = 0
    """Optimizer-independent loader steps per epoch on every rank; 0 = the split size / global batch."""
    shuffle_buffer: int = 1000
    """Streaming mode only: samples held in the per-worker shuffle buffer."""
    stream_resample: bool = True
    """Streaming mode only: every (rank, worker) draws shards with replacement (any shard count
    works); false = each shard read once per pass, split by rank then worker (needs at least
    world size x max(1, num_workers) shards; the epoch is cut to the smallest worker's share)."""
    sample_rate: int = 16000
    max_audio_seconds: float = 8.0
    video_frames: int = 8
    video_size: int = 64
    """Frames are resized to video_size x video_size after decoding."""
    max_text_tokens: int = 64
    text_context: int = 0
    """Previous dialogue turns given to the text encoder after the utterance (MELD shards store up to 3
    in each sample's metadata): [CLS] utterance [SEP] "Speaker: turn ..." [SEP], the utterance never cut
    for context, the oldest context tokens cut first to fit max_text_tokens. 0 = the utterance alone."""
    bucket_by_length: bool = False
    """Group samples of similar audio length into a batch to limit padding."""
    folds: int = 0
    """0: the packed splits (data.train_split / eval_split name them). K >= 2: speaker-independent folds chosen
    now: the packed split data.fold_source is cut by speaker into K groups (mmer_dist.folds); the splits are
    then "train", "dev" and "test" (`mmer-dist pack ravdess --split none` packs every actor into "all")."""
    fold: int = 0
    """With data.folds=K: the fold held out as "test" (0..K-1)."""
    dev_speakers: int = 2
    """With data.folds=K: speakers carved from the training speakers (those just before the test fold) as "dev"."""
    fold_source: str = "all"
    """With data.folds=K: the packed split the folds are cut from."""
    max_skip_fraction: float = 0.01
    """Training fails (naming the last sample skipped, its shard and why) when more than this fraction of the
    samples read failed to decode (summed over ranks and the run's processes). I/O errors on a shard the
    index calls complete always fail the run at once."""

    def __post_init__(self) -> None:
        _check(len(self.modalities) > 0, "data.modalities is empty; use e.g. data.modalities=[text]")
        for m in self.modalities:
            _check_choice("data.modalities item", m, MODALITIES)
        _check(len(set(self.modalities)) == len(self.modalities), f"data.modalities={list(self.modalities)} repeats a modality")
        _check(self.batch_size >= 1, f"data.batch_size={self.batch_size} must be >= 1")
        _check(self.global_batch_size >= 0, f"data.global_batch_size={self.global_batch_size} must be >= 0 (0 = off)")
        _check(self.eval_batch_size >= 1, f"data.eval_batch_size={self.eval_batch_size} must be >= 1")
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        _check(self.read_retries >= 1, f"data.read_retries={self.read_retries} must be >= 1 (attempts per read)")
        _check(self.read_timeout_s > 0, f"data.read_timeout_s={self.read_timeout_s} must be > 0 (seconds)")
        _check(self.loader_timeout_s > 0, f"data.loader_timeout_s={self.loader_timeout_s} must be > 0 (seconds)")
        _check_choice("data.loader", self.loader, ("map", "stream"))
        _check(self.steps_per_epoch >= 0, "data.steps_per_epoch must be >= 0 (0 = derived from the split size)")
        _check(self.max_audio_seconds > 0, "data.max_audio_seconds must be > 0")
        _check(self.video_frames >= 1 and self.video_size >= 8, "data.video_frames must be >= 1 and data.video_size >= 8")
        _check(self.max_text_tokens >= 4, "data.max_text_tokens must be >= 4")
        _check(self.text_context >= 0, "data.text_context must be >= 0 (0 = the utterance alone)")
        _check(self.folds == 0 or self.folds >= 2, f"data.folds={self.folds}: 0 (the packed splits) or >= 2")
        _check(self.folds == 0 or 0 <= self.fold < self.folds,
               f"data.fold={self.fold} must be in 0..{self.folds - 1} (data.folds={self.folds})")
        _check(self.dev_speakers >= 0, f"data.dev_speakers={self.dev_speakers} must be >= 0")
        _check(not self.folds or self.eval_split != "dev" or self.dev_speakers >= 1,
               "data.eval_split=dev with data.folds needs data.dev_speakers >= 1 (the dev speakers)")
        _check(0.0 <= self.max_skip_fraction <= 1.0, f"data.max_skip_fraction={self.max_skip_fraction} must be in "
                                                     f"[0, 1] (0 = no decode failure tolerated)")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class EncoderConfig:
    """One modality encoder. `kind` picks the family; `size` picks a named size of it."""

    kind: str = "hf"
    """hf: a `transformers` AutoModel (pretrained or random-init from `size`);
    scratch: a light from-scratch encoder (log-mel conv/transformer for audio, frame CNN for video);
    cached: precomputed embeddings from `mmer-dist embed`."""
    pretrained: str = ""
    """Hub id or local folder to load; "" = the named size's default (random-init for debug)."""
    size: str = "debug"
    """debug (tiny, random-init, offline) | small | base (the usual pretrained ids)."""
    freeze: bool = False
    """Freeze the whole encoder (its parameters are left out of the optimizer)."""
    unfreeze_after_steps: int = 0
    """With freeze=true and > 0: unfreeze at this optimizer step (freeze-then-unfreeze)."""
    freeze_feature_extractor: bool = True
    """Audio hf encoders: keep the convolutional feature extractor frozen."""
    gradient_checkpointing: bool = False
    dropout: float = 0.1
    """Dropout inside from-scratch and random-init (debug) encoders; pretrained ones keep their own."""
    pooling: str = "tokens"
    """tokens: hand the fusion the token sequence; mean/cls: one pooled vector."""
    spec_augment: bool = False
    """model.audio with kind=scratch only: SpecAugment in training (2 frequency masks of up to 8 mel bands
    and 2 time masks of up to 0.2 s per utterance, on the normalised log-mel; no time warping)."""
    dim: int = 0
    """kind=cached only: width D of the stored features; 0 = that of the encoder named by pretrained/size
    (read from its config; set it when that encoder is not available here, e.g. model.text.dim=768)."""

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, ("hf", "scratch", "cached"))
        _check_choice("size", self.size, ("debug", "small", "base"))
        _check_choice("pooling", self.pooling, ("tokens", "mean", "cls"))
        _check(self.unfreeze_after_steps >= 0, f"unfreeze_after_steps={self.unfreeze_after_steps} must be >= 0")
        _check(self.dim >= 0, f"dim={self.dim} must be >= 0 (0 = the named encoder's width)")
        _check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        _check(self.unfreeze_after_steps == 0 or self.freeze,
               f"unfreeze_after_steps={self.unfreeze_after_steps} needs freeze=true (freeze-then-unfreeze)")


@dataclass(frozen=True)
class FusionConfig:
    """The cross-modal transformer over all encoders' token sequences."""

    width: int = 64
    """Model width of the fusion transformer (every modality is projected to it)."""
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    """Dropout inside the fusion transformer and the head."""
    modality_dropout: float = 0.0
    """Training only: probability of dropping each present modality of a sample (never all)."""
    max_tokens_per_modality: int = 64
    """Longer encoder outputs are average-pooled down to this many tokens before fusion."""
    positions: bool = True
    """Add a learned position embedding (per pooled token index) to each modality's tokens."""

    def __post_init__(self) -> None:
        _check(self.layers >= 1 and self.heads >= 1, f"model.fusion.layers={self.layers} and model.fusion.heads="
                                                     f"{self.heads} must be >= 1")
        _check(self.width % self.heads == 0,
               f"model.fusion.width={self.width} must be divisible by model.fusion.heads={self.heads}")
        _check(0.0 <= self.dropout < 1.0 and 0.0 <= self.modality_dropout < 1.0,
               "model.fusion.dropout and model.fusion.modality_dropout must be in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """Encoders + fusion + head. `num_classes` and label names come from the shards' index."""

    text: EncoderConfig = field(default_factory=lambda: EncoderConfig(kind="hf", pretrained="minilm", size="small"))
    """`pretrained` wins over `size`: "minilm" = the packaged all-MiniLM-L6-v2; "" + size=debug = tiny random-init."""
    audio: EncoderConfig = field(default_factory=lambda: EncoderConfig(kind="scratch"))
    video: EncoderConfig = field(default_factory=lambda: EncoderConfig(kind="scratch"))
    fusion: FusionConfig = field(default_factory=FusionConfig)
    modalities: tuple[str, ...] = ("text", "audio", "video")
    """Encoders to build; set from data.modalities when the run starts."""
    num_classes: int = 7
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        for m in self.modalities:
            _check_choice("model.modalities item", m, MODALITIES)
        _check(self.num_classes >= 2, "model.num_classes must be >= 2")
        _check(self.text.kind != "scratch", "model.text.kind=scratch does not exist; use hf (or cached)")
        _check(not (self.text.spec_augment or self.video.spec_augment),
               "spec_augment is an audio option: set model.audio.spec_augment, not model.text/video")
        _check(not self.audio.spec_augment or self.audio.kind == "scratch",
               f"model.audio.spec_augment=true needs model.audio.kind=scratch (got {self.audio.kind!r}: hf speech "
               f"models run with their own SpecAugment disabled, cached features are fixed)")


@dataclass(frozen=True)
class LossConfig:
    """The training loss: the class-imbalance knob on the objective side."""

    name: str = "ce"
    """ce | weighted_ce (inverse-frequency class weights) | focal | class_balanced (effective number) |
    logit_adjusted (CE on logits + la_tau log(class prior); Menon et al. 2021)."""
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    cb_beta: float = 0.999
    """Class-balanced loss beta (Cui et al. 2019)."""
    la_tau: float = 1.0
    """Logit-adjusted loss: strength of the prior offset (1 = aim at the balanced error, 0 = plain CE)."""

    def __post_init__(self) -> None:
        _check_choice("loss.name", self.name, LOSSES)
        _check(self.la_tau >= 0.0, "loss.la_tau must be >= 0 (0 = plain cross-entropy)")
        _check(0.0 <= self.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)")
        _check(self.focal_gamma >= 0.0, "loss.focal_gamma must be >= 0")
        _check(0.0 < self.cb_beta < 1.0, "loss.cb_beta must be in (0, 1)")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with per-group learning rates, warmup + cosine decay."""

    lr: float = 1e-3
    """Learning rate of the fusion transformer and the head."""
    encoder_lr: float = 1e-4
    """Learning rate of the (unfrozen) encoders."""
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """Cosine decays to lr x min_lr_ratio at the last step."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(self.encoder_lr >= 0, f"optim.encoder_lr={self.encoder_lr} must be >= 0")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 = no clipping)")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(len(self.betas) == 2, "optim.betas needs two values, e.g. [0.9, 0.999]")


_ZERO_MEANS = {"epochs": "train.max_steps decides", "max_steps": "train.epochs x steps per epoch",
               "eval_every": "at the end of every epoch", "checkpoint_every": "at the end of every epoch"}


@dataclass(frozen=True)
class TrainConfig:
    """The loop: length, precision, evaluation, checkpoints."""

    epochs: int = 3
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 = epochs x steps per epoch."""
    grad_accum: int = 1
    mixed_precision: str = "auto"
    """auto (bf16 on a GPU that supports it, fp32 on CPU) | no | bf16 | fp16."""
    eval_every: int = 0
    """Evaluate on data.eval_split every N optimizer steps; 0 = at the end of every epoch."""
    select: str = "best"
    """Which weights a run exports: best (the evaluation with the highest eval-split Macro-F1) | last
    (the final weights; evaluations still run for the curves). `last` suits a small, speaker-few dev
    split whose per-epoch scores are too noisy to pick from (benchmarks/README.md, RAVDESS)."""
    ema_decay: float = 0.0
    """0 = off; else evaluations, the best/last choice and the export use an exponential moving average
    of the weights with this decay per optimizer step (e.g. 0.995: a window of ~200 steps; training
    continues from the live weights). Not with DeepSpeed ZeRO-3."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps; 0 = at the end of every epoch."""
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    resume: str = ""
    """"" = a fresh run (refused when the run folder has checkpoints) | latest = continue from the newest complete
    checkpoint; with none yet it says so and starts fresh (what a Slurm requeue needs) | must = like latest, but
    with no checkpoint it refuses | a checkpoint folder. A resume must keep the run's config (RUN/config.yaml,
    never rewritten): only the keys in mmer_dist.train.resume.MAY_CHANGE (length, eval/log/checkpoint cadence,
    checkpoints kept, dist timeout) may differ; they are applied and recorded in RUN/resumes.jsonl."""
    deepspeed: str = ""
    """Path of a DeepSpeed JSON (launch/ds_zero2.json); usually set by the launcher instead."""
    dist_timeout_s: float = 600.0
    """Process-group timeout: a collective that waits longer (a rank died or hangs) ends the run with an
    error instead of waiting for torch's default (30 min for gloo, 10 for NCCL)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "max_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{name}={value} must be >= 0 (0 = {_ZERO_MEANS[name]})")
        _check(self.epochs >= 1 or self.max_steps >= 1, "train.epochs or train.max_steps must be >= 1")
        _check(self.grad_accum >= 1, f"train.grad_accum={self.grad_accum} must be >= 1")
        _check(self.dist_timeout_s > 0, f"train.dist_timeout_s={self.dist_timeout_s} must be > 0 (seconds)")
        _check_choice("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        _check_choice("train.select", self.select, ("best", "last"))
        _check(0.0 <= self.ema_decay < 1.0, f"train.ema_decay={self.ema_decay} must be in [0, 1): 0 = off, "
                                            f"else e.g. 0.995")
        _check(self.keep_checkpoints >= 1, f"train.keep_checkpoints={self.keep_checkpoints} must be >= 1")
        _check(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1")


@dataclass(frozen=True)
class Config:
    """The root config of a run; `mmer-dist train --dump-config` prints it resolved."""

    name: str = "default"
    """Preset name, for the record."""
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        missing = [m for m in self.data.modalities if m not in self.model.modalities]
        _check(not missing, f"data.modalities has {missing} but model.modalities={list(self.model.modalities)}; "
                            f"set model.modalities to include them (or drop them from data.modalities)")


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace re-exported so callers need not import dataclasses."""
    return dataclasses.replace(cfg, **changes)
