"""`mmer-dist verify`: a flipped byte and a truncated tar are found and named, a clean folder passes,
and the printed repair (move aside + the pack command rebuilt from pack.json) restores the same bytes."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import pytest

from mmer_dist.cli import main as cli_main
from mmer_dist.corpora.synthetic import write_corpus
from mmer_dist.shards.pack import pack
from mmer_dist.shards.schema import read_stats


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "meld"
    write_corpus("meld", root, n=21, seed=0, min_per_split=1)
    out = tmp_path_factory.mktemp("shards") / "meld"
    pack("meld", root, out, shard_samples=4, video_size=32, video_fps=4.0, progress=False)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)          # the compact index (samples/) too
    return dst


def _cli(*argv: str) -> int:
    return cli_main(list(argv))


def _files(d: Path) -> dict[str, bytes]:
    """The pack's files: top level and the compact index (not what verify moved aside into damaged/)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted([*d.iterdir(), *d.glob("samples/*/*")])
            if p.is_file() and not p.name.startswith(".lock-")}


def test_stats_record_the_sha256_of_every_tar(packed: Path) -> None:
    tars = sorted(packed.glob("*.tar"))
    assert tars
    for tar in tars:
        assert read_stats(packed, tar.name).sha256 == hashlib.sha256(tar.read_bytes()).hexdigest()


def test_clean_folder_passes(packed: Path, capsys: pytest.CaptureFixture) -> None:
    assert _cli("verify", str(packed)) == 0
    out = capsys.readouterr().out
    assert "0 damaged" in out and "by size only" not in out


def test_flipped_byte_and_truncated_tar_are_found(packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    work = _copy(packed, tmp_path / "damaged")
    flipped, truncated = sorted(work.glob("*.tar"))[1:3]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01                      # same size, one bit off
    flipped.write_bytes(bytes(data))
    full = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:-1024])
    assert _cli("verify", str(work)) == 1
    out = capsys.readouterr().out
    assert "2 damaged" in out
    want = read_stats(work, flipped.name).sha256
    assert f"DAMAGED {flipped.name}: sha256 expected {want}, found {hashlib.sha256(bytes(data)).hexdigest()}" in out
    assert f"DAMAGED {truncated.name}: size expected {full} bytes, found {full - 1024} bytes" in out
    assert sum(line.startswith("  DAMAGED") for line in out.splitlines()) == 2


def test_move_aside_then_the_printed_command_restores_the_bytes(packed: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    work = _copy(packed, tmp_path / "repair")
    victim = sorted(work.glob("*.tar"))[0]
    victim.write_bytes(b"garbage")
    capsys.readouterr()
    assert _cli("verify", str(work), "--move-aside") == 1
    out = capsys.readouterr().out
    command = out.strip().splitlines()[-1].strip()
    assert command.startswith("mmer-dist pack meld --root ") and f"--out {work}" in command
    assert not victim.exists() and (work / "damaged" / victim.name).read_bytes() == b"garbage"
    argv = shlex.split(command)[1:]
    assert _cli(*argv) == 0
    assert "1 written now" in capsys.readouterr().out      # only the damaged shard was re-packed
    assert {k: v for k, v in _files(work).items()} == _files(packed)
    assert _cli("verify", str(work)) == 0


def test_shard_listed_in_the_index_without_stats_is_damaged(packed: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    work = _copy(packed, tmp_path / "nostats")
    index = json.loads((work / "index.json").read_text())
    shard = index["splits"]["dev"]["shards"][0]
    (work / shard.replace(".tar", ".stats.json")).unlink()
    assert _cli("verify", str(work)) == 1
    assert f"DAMAGED {shard}: no stats" in capsys.readouterr().out
    assert _cli("verify", str(tmp_path)) == 2              # not a shards folder: a clear error, not a pass
