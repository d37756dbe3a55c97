"""`mmer-dist demo` end to end at a smaller size: synth -> pack -> 2-process training x 2 -> eval -> compare."""

from __future__ import annotations

import json

import pytest

from mmer_dist.demo import run_demo


@pytest.mark.slow
def test_demo_small(tmp_path, capsys):
    results = run_demo(tmp_path / "demo", n=150, nproc=2,
                       extra=["train.epochs=1", "optim.warmup_steps=1", "data.batch_size=8", "data.num_workers=0"])
    assert set(results) == {"baseline", "weighted"}
    out = capsys.readouterr().out
    assert "[5/5] compare" in out and "Report:" in out
    for name in results:
        run = tmp_path / "demo" / "runs" / name
        ev = tmp_path / "demo" / "eval-test" / name
        assert json.loads((run / "env.json").read_text())["world_size"] == 2
        assert (run / "export" / "model.safetensors").exists()
        metrics = json.loads((ev / "metrics.json").read_text())
        assert metrics["split"] == "test" and metrics["n"] == results[name]["n"] > 0
        for png in ("confusion.png", "per_class_f1.png", "curves.png"):
            assert (ev / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cmp = json.loads((tmp_path / "demo" / "compare" / "compare.json").read_text())
    assert [r["name"] for r in cmp["runs"]] == ["baseline", "weighted"]
