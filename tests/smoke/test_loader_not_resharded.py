"""Two processes (torchrun, gloo, CPU): Accelerate must not shard our per-rank loader a second time.

Each rank builds its loader with `build_train_loader(rank=r, world_size=2)` and trains a tiny
model prepared with `Accelerator(cpu=True).prepare(model, optimizer)`: it must see exactly the
batches the same loader yields when built in a single process for rank r. Then the same
DataLoader is passed through `accelerator.prepare` (the mistake the pipeline docstring warns
about): the batches each rank sees change (every other batch only), which is what would have
silently halved every rank's data.

Shards: a synthetic text-only MELD corpus packed with the real packer (`mmer-dist pack`).
This file is also the worker script: `torchrun --nproc_per_node 2 THIS_FILE SHARDS OUT`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmer_dist.config import DataConfig, SamplerConfig

CFG = DataConfig(modalities=("text",), batch_size=3, num_workers=0, max_text_tokens=16)


class WordTokenizer:
    pad_token_id = 0

    def __call__(self, text: str, truncation: bool = True, max_length: int = 512) -> dict:
        return {"input_ids": ([1] + [3 + (sum(map(ord, w)) % 500) for w in text.split()])[: max_length - 1] + [2]}


def worker(shards: str, out: str) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from mmer_dist.data.build import build_train_loader

    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(0)
    model = torch.nn.Linear(600, 7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)             # only model + optimizer, as the loop does
    loader = build_train_loader(shards, CFG, SamplerConfig(), WordTokenizer(), rank=rank, world_size=world)
    ours = []
    for batch in loader:
        bag = torch.zeros(len(batch["keys"]), 600).scatter_add_(1, batch["text_ids"], batch["text_mask"].float())
        logits = model(bag)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        acc.backward(loss)                           # DDP all-reduce: both ranks step together
        opt.step()
        opt.zero_grad()
        ours.append(batch["keys"])
    loader.sampler.seek(0)                           # the same epoch again, through the raw DataLoader
    prepared = acc.prepare(loader.loader)            # the mistake: Accelerate shards it again
    theirs = [b["keys"] for b in prepared]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"world": world, "ours": ours, "prepared": theirs,
                                                          "len": len(loader)}))
    acc.wait_for_everyone()
    acc.end_training()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_see_their_own_batches_not_resharded(tmp_path):
    from mmer_dist.corpora.synthetic import write_meld
    from mmer_dist.data.build import build_train_loader
    from mmer_dist.shards.pack import pack

    write_meld(tmp_path / "raw", n=80, seed=0, clips=False)
    shards = tmp_path / "shards"
    pack("meld", tmp_path / "raw", shards, workers=1, shard_samples=8, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           __file__, str(shards), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    expected = [[b["keys"] for b in build_train_loader(shards, CFG, SamplerConfig(), WordTokenizer(), rank=r, world_size=2)]
                for r in range(2)]
    for r, res in enumerate(results):
        assert res["world"] == 2
        assert res["ours"] == expected[r], f"rank {r} saw other batches than its per-rank loader"
        assert len(res["ours"]) == res["len"] == len(expected[0])
        # prepared: a second shard over the rank's own batches -> a different, smaller stream
        # (BatchSamplerShard: rank r keeps batches r, r + 2, ... of what was already its own share)
        assert res["prepared"] == res["ours"][r::2]
        assert len(res["prepared"]) == len(res["ours"]) // 2 >= 1
    # the two ranks together saw the split once (disjoint), equal steps
    flat = [k for res in results for b in res["ours"] for k in b]
    assert len(flat) == len(set(flat))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
