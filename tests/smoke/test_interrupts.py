"""Ctrl-C and a step-wide SIGTERM on a real training process (a checkpoint at the next step and a clean exit; a second Ctrl-C aborts
at once with 130), and what a run imports: no DeepSpeed unless it uses DeepSpeed, nothing heavy for
`--help`. Rows of docs/faults.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmer_dist.cli import COMMANDS
from mmer_dist.train.checkpoint import complete_checkpoints

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
ARGS = ["--config", "debug", "data.modalities=[text,audio]", "train.log_every=1", "optim.warmup_steps=2",
        "train.epochs=50", "train.checkpoint_every=1000", "data.num_workers=2"]


class Training:
    """`python -m mmer_dist.train` in a subprocess of its own process group (as a terminal runs it), its output
    collected as it comes."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mmer_dist.train", *args], cwd=REPO, env=ENV, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.out = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:          # text mode: tqdm's \r ends a line too
            self.out += line

    def wait_for(self, ok, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not ok():
            assert self.proc.poll() is None and time.time() < deadline, f"{what} never happened:\n{self.out[-3000:]}"
            time.sleep(0.02)

    def interrupt(self) -> None:
        """Ctrl-C in a terminal: SIGINT to the whole group, the DataLoader workers too."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def terminate(self) -> None:
        """What srun does to a job step (a preemption, `scancel --signal=TERM`): SIGTERM to every process of it."""
        os.killpg(self.proc.pid, signal.SIGTERM)

    def finish(self) -> int:
        rc = self.proc.wait(timeout=300)
        time.sleep(0.2)                        # let the reader drain the pipe
        return rc


def _steps(run: Path) -> list[int]:
    if not (run / "log.jsonl").exists():
        return []
    return [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_ctrl_c_checkpoints_at_the_next_step_and_a_second_one_aborts(synth_meld_shards, tmp_path):
    run = tmp_path / "run"
    args = [*ARGS, "--shards", str(synth_meld_shards), "--out", str(run)]
    first = Training(args)
    first.wait_for(lambda: len(_steps(run)) >= 2, "two logged steps")
    first.interrupt()
    assert first.finish() == 0, first.out
    assert "interrupt: saving a checkpoint after this step, then exiting (Ctrl-C again to abort at once)" in first.out
    (ckpt,) = complete_checkpoints(run)
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert f"SIGINT received: checkpoint saved at step {step}; run the same command with resume=latest" in first.out
    assert "Traceback" not in first.out and "KeyboardInterrupt" not in first.out and step == max(_steps(run))

    second = Training([*args, "resume=latest"])
    second.wait_for(lambda: max(_steps(run)) > step, "a step after the resume")
    second.interrupt()
    second.wait_for(lambda: "interrupt: saving a checkpoint" in second.out, "the first interrupt's message")
    second.interrupt()
    assert second.finish() == 130, second.out
    assert "second interrupt: aborting now without a checkpoint" in second.out and "Traceback" not in second.out
    assert ckpt in complete_checkpoints(run)              # the first stop's checkpoint is intact: resume from it
    assert json.loads((run / "resumes.jsonl").read_text())["step"] == step


def test_sigterm_to_every_process_checkpoints_with_loader_workers(synth_meld_shards, tmp_path):
    """The DataLoader workers get the step-wide SIGTERM too: they ignore it, the main process checkpoints."""
    run = tmp_path / "run"
    job = Training([*ARGS, "--shards", str(synth_meld_shards), "--out", str(run)])
    job.wait_for(lambda: len(_steps(run)) >= 2, "two logged steps")
    job.terminate()
    assert job.finish() == 0, job.out
    (ckpt,) = complete_checkpoints(run)
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert f"SIGTERM received: checkpoint saved at step {step}" in job.out, job.out[-3000:]
    assert "killed by signal" not in job.out and "Traceback" not in job.out


def test_train_eval_and_predict_without_deepspeed_never_import_it(synth_meld_shards, tmp_path):
    run = tmp_path / "run"
    code = (
        "import sys\n"
        "from mmer_dist.cli import main\n"
        f"assert main(['train', '--config', 'debug', '--shards', {str(synth_meld_shards)!r}, '--out', {str(run)!r},"
        " 'data.modalities=[text,audio]', 'train.max_steps=2', 'optim.warmup_steps=1']) == 0\n"
        f"assert main(['eval', '--model', {str(run)!r}, '--shards', {str(synth_meld_shards)!r}, '--split', 'dev',"
        f" '--out', {str(tmp_path / 'eval')!r}]) == 0\n"
        f"assert main(['predict', '--model', {str(run)!r}, '--text', 'hello']) == 0\n"
        "print('deepspeed imported:', 'deepspeed' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed imported: False" in proc.stdout
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_imports_nothing_heavy(command):
    code = ("import sys\nfrom mmer_dist.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'deepspeed', 'matplotlib') "
            "if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"`mmer-dist {command} --help` imports {proc.stdout}"


def test_ctrl_c_during_pack_says_interrupted_and_the_same_command_resumes(synth_meld_raw, synth_meld_shards, tmp_path):
    from mmer_dist.shards.schema import load_index

    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "mmer_dist.cli", "pack", "meld", "--root", str(synth_meld_raw), "--out", str(out),
           "--shard-samples", "1", "--video-size", "32", "--video-fps", "4"]
    # SIGINT back to its default in the child: a shell without job control starts background commands
    # (a CI script's `... &`) with SIGINT ignored, and Python then leaves it ignored (no KeyboardInterrupt)
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(list(out.glob("*.stats.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and printed.rstrip().endswith("interrupted") and "Traceback" not in printed
    done = len(list(out.glob("*.stats.json")))
    assert not (out / "index.json").exists() and 2 <= done < 120, "the pack finished before the interrupt"
    resumed = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done} already complete" in resumed.stdout
    import tarfile

    def keys(root: Path) -> dict[str, list[str]]:
        index = load_index(root)
        out_keys = {}
        for split, si in index.splits.items():
            names = []
            for shard in si.shards:
                with tarfile.open(root / shard) as tf:
                    names += {m.name.split(".")[0] for m in tf.getmembers()}
            out_keys[split] = sorted(names)
        return out_keys

    assert keys(out) == keys(synth_meld_shards)                      # every sample once, none lost or doubled
