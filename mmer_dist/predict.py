"""`mmer-dist predict`: the emotion of one raw utterance (any subset of video, audio, text).

Uses exactly the decode path of training (`mmer_dist.data.decode`) with the decode settings
stored in the exported model, so a clip gets the label the model gives it in `mmer-dist eval`.

    mmer-dist predict --model runs/demo/weighted --video clip.mp4 --text "I can't believe it!"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from mmer_dist.config import DataConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmer-dist predict",
        description="Predict the emotion of one raw utterance, decoded exactly as in training with the decode "
                    "settings stored in the exported model.")
    p.add_argument("--model", required=True, nargs="+",
                   help="run folder, exported model folder or checkpoint folder (RUN/checkpoints/step-N); several: "
                        "their ensemble (averaged probabilities)")
    p.add_argument("--video", default=None, help="video clip (mp4); its audio track is used when --audio is not given")
    p.add_argument("--audio", default=None, help="audio file (wav, flac, mp3, or a video's audio track)")
    p.add_argument("--text", default=None, help="transcript")
    p.add_argument("--context", action="append", default=None, metavar="'SPEAKER: WORDS'",
                   help="an earlier turn of the dialogue (repeat, oldest first); used by models trained with "
                        "data.text_context > 0, which read the last N of them after the transcript")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def decode_files(video: str | Path | None = None, audio: str | Path | None = None, text: str | None = None,
                 cfg_data: DataConfig | None = None, tokenizer: Callable[..., Any] | None = None,
                 context: list[str] | None = None) -> dict[str, Any]:
    """Decode raw files for `mmer-dist predict`, through the same path as training (eval crop).

    Any subset of video/audio/text; the result is a sample dict with label -1, ready for
    `Collator(cfg.data)([sample])`. `context`: earlier dialogue turns, oldest first, as "Speaker: words"
    (used when the model was trained with data.text_context > 0). Raises FileNotFoundError /
    DecodeError naming the file.
    """
    from mmer_dist.data.decode import DecodeError, decode_sample
    from mmer_dist.shards.schema import AUDIO_EXTS, META_EXT, TEXT_EXT, VIDEO_EXTS

    if cfg_data is None:
        raise ValueError("decode_files needs cfg_data (the run's cfg.data)")
    if not video and not audio and not text:
        raise ValueError("decode_files: give at least one of --video, --audio, --text")
    members: dict[str, Any] = {}
    names = []
    for path, kinds in ((video, VIDEO_EXTS), (audio, AUDIO_EXTS)):
        if path is None or str(path) == "":
            continue
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        ext = p.suffix.lower().lstrip(".")
        if ext not in kinds:
            # unknown container: let PyAV sniff it, under the first name of the right kind
            ext = "mp4" if kinds is VIDEO_EXTS else "mp3"
        members[ext] = p.read_bytes()
        names.append(p.stem)
    if text:
        members[TEXT_EXT] = text.encode("utf-8")
    if context:
        turns = [dict(zip(("speaker", "text"), t.split(": ", 1))) if ": " in t else {"text": t} for t in context]
        members[META_EXT] = json.dumps({"label_id": -1, "meta": {"context": turns}}).encode("utf-8")
    key = names[0] if names else "text"
    try:
        return decode_sample(members, cfg_data, tokenizer, train=False, rng=None, key=key, require_label=False)
    except DecodeError as e:
        raise DecodeError(e.reason, key, f"{', '.join(str(x) for x in (video, audio) if x)}: {e.detail}") from e


def predict(model_path: str | Path | list[str | Path], video: str | None = None, audio: str | None = None,
            text: str | None = None, context: list[str] | None = None) -> dict[str, Any]:
    """{"label": name, "probabilities": {name: p}, "modalities": [used]} for one utterance; several models:
    their ensemble (the average of their probabilities; "members" lists each one's answer)."""
    if isinstance(model_path, (list, tuple)) and len(model_path) > 1:
        members = [predict(m, video, audio, text, context) for m in model_path]
        labels = list(members[0]["probabilities"])
        if any(list(m["probabilities"]) != labels for m in members):
            raise ValueError("the models predict different label sets; an ensemble needs models of one corpus")
        probs = {name: sum(m["probabilities"][name] for m in members) / len(members) for name in labels}
        return {"label": max(probs, key=probs.get), "probabilities": probs,
                "modalities": sorted({x for m in members for x in m["modalities"]}),
                "members": [{"model": str(p), "label": m["label"]} for p, m in zip(model_path, members)]}
    if isinstance(model_path, (list, tuple)):
        model_path = model_path[0]
    import torch

    from mmer_dist.data.collate import Collator
    from mmer_dist.models import build_tokenizer
    from mmer_dist.train.checkpoint import load_exported

    if not (video or audio or text):
        raise ValueError("give at least one of --video, --audio, --text")
    for path in (video, audio):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    model, model_cfg, data_cfg, labels = load_exported(model_path)
    tokenizer = build_tokenizer(model_cfg.text) if "text" in data_cfg.modalities else None
    sample = decode_files(video=video, audio=audio, text=text, cfg_data=data_cfg, tokenizer=tokenizer,
                          context=context)
    batch = Collator.for_tokenizer(data_cfg, tokenizer)([sample])
    with torch.no_grad():
        probs = torch.softmax(model(batch).float(), dim=-1)[0]
    used = [m for m in data_cfg.modalities if f"{m}_mask" in batch and bool(batch[f"{m}_mask"].any())]
    check_inputs_used(video, audio, text, tuple(data_cfg.modalities), used)
    best = int(probs.argmax())
    return {"label": labels[best], "probabilities": {name: float(p) for name, p in zip(labels, probs)},
            "modalities": used}


def media_streams(path: str | Path) -> list[str] | None:
    """The audio/video streams of a file as "video (h264)", "audio (aac)"; None when FFmpeg cannot open it."""
    import av

    try:
        with av.open(str(path)) as container:
            return [f"{s.type} ({s.codec_context.name})" for s in container.streams if s.type in ("audio", "video")]
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def _holds(streams: list[str] | None) -> str:
    if streams is None:
        return "it is not a media file FFmpeg can open"
    return f"it holds {' + '.join(streams)}" if streams else "it holds no audio or video stream"


def check_inputs_used(video: str | None, audio: str | None, text: str | None, modalities: tuple[str, ...],
                      used: list[str]) -> None:
    """Every input was used as its flag says, else ValueError naming the flag, the file and what it holds:
    `--audio` gives the model audio; `--video` is a video (its frames feed a model with video; a model
    without video, given no --audio, hears its audio track); an input the model was not trained on is an
    error, never silently ignored."""
    trained = f"the model was trained on {', '.join(modalities)}"
    if audio and "audio" not in modalities:
        raise ValueError(f"--audio {audio}: {trained}, without audio; drop --audio")
    if audio and "audio" not in used:
        raise ValueError(f"--audio {audio}: no audio could be decoded from it ({_holds(media_streams(audio))}); "
                         f"give a wav/flac/mp3 file or a clip with an audio track")
    if text and "text" not in modalities:
        raise ValueError(f"--text: {trained}, without text; drop --text")
    if not video or "video" in used:
        return
    streams = media_streams(video)
    if not any(s.startswith("video") for s in streams or []):
        hint = "it is audio: pass it as --audio" if any(s.startswith("audio") for s in streams or []) else \
            "give an mp4 clip"
        raise ValueError(f"--video {video}: no video stream ({_holds(streams)}); {hint}")
    if "video" in modalities:
        raise ValueError(f"--video {video}: no video frames could be decoded from it ({_holds(streams)}); "
                         f"give a readable mp4 clip")
    if audio or "audio" not in used:
        why = "--audio gives the audio" if audio else "its audio track gave no audio"
        raise ValueError(f"--video {video}: {trained}, without video, and {why}; drop --video")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mmer_dist.data.decode import DecodeError

    try:
        result = predict(args.model, video=args.video, audio=args.audio, text=args.text, context=args.context)
    except DecodeError as e:
        print(f"mmer-dist predict: cannot decode {e.detail or e.key} ({e.reason}); give a readable mp4/wav/flac file",
              file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"mmer-dist predict: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['label']}  (from {', '.join(result['modalities']) or 'no usable modality'})")
    for name, p in sorted(result["probabilities"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<10} {p:6.3f}  {'#' * round(p * 40)}")
    return 0
