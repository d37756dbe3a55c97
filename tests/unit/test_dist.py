"""World info from launcher environments (torchrun, Slurm), Slurm nodelists, backend choice."""

from __future__ import annotations

from mmer_dist import dist


def test_single_process_default():
    info = dist.world_info({})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (0, 1, 0, "single")
    assert info.is_main


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    info = dist.world_info(env)
    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 1)
    assert (info.master_addr, info.master_port, info.source) == ("node7", 1234, "torchrun")
    assert not info.is_main


def test_torchrun_wins_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "16"}
    assert dist.world_info(env).source == "torchrun"


def test_slurm_variables_and_head_node():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[03-04,10],login2"}
    info = dist.world_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.source) == (5, 16, 1, "slurm")
    assert info.master_addr == "gpu03"


def test_expand_nodelist():
    assert dist.expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert dist.expand_nodelist("a1") == ["a1"]
    assert dist.expand_nodelist("n[8-10]") == ["n8", "n9", "n10"]
    assert dist.expand_nodelist("rack1-n[001-002]") == ["rack1-n001", "rack1-n002"]


def test_export_slurm_env():
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "h[1-2]"}
    dist.export_slurm_env(env)
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "4" and env["MASTER_ADDR"] == "h1"
    single = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "h1"}
    dist.export_slurm_env(single)
    assert "MASTER_PORT" not in single and "RANK" not in single


def test_backend_choice():
    assert dist.backend(cuda_available=True) == "nccl"
    assert dist.backend(cuda_available=False) == "gloo"


def test_single_process_reductions_are_identity():
    import torch

    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce_sum(t), t)
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(7) == 7
    assert dist.is_main() and dist.world_size() == 1
