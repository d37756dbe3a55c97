"""A real two-node Slurm cluster on this one machine, for the tests in tests/slurm (session scope).

    def test_x(slurm):                            # the `slurm` fixture: a running Cluster
        job = slurm.sbatch("--nodes=2", "slurm/train.sbatch", "--config", "debug", ...)
        states = slurm.wait(job)                  # every element in a final state

The fixture writes slurm.conf into a temp folder, starts its own munged (own key and socket there,
so it never meets a system munged), one slurmctld and two slurmd (`-N node1`, `-N node2`, both
NodeAddr=127.0.0.1 with their own Port, spool/pid/log per node through %n), on free ports, and waits
until `sinfo` shows both nodes idle. Every command gets the config through SLURM_CONF. At the end it
cancels leftover jobs, stops exactly the daemons it started (by pid), and fails the session if any
process that belongs to the cluster is still alive. The tests skip, with the reason, when the Slurm
binaries are absent (`.ci/run` installs them: apt-get install slurm-wlm munge).

Slurm makes a requeued job eligible only 120 s after the requeue (a fixed delay in slurmctld);
`Cluster.release` starts it now instead (`scontrol update JobId=J StartTime=now`), as an admin would.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}
NODES = ("node1", "node2")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mem_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return max(1024, min(4000, total_kb // 1024 // 4))


def write_conf(root: Path, ports: list[int]) -> Path:
    """slurm.conf for a controller and two nodes on this host (NodeAddr 127.0.0.1, own port each)."""
    host, user, cpus = socket.gethostname(), getpass.getuser(), os.cpu_count() or 1
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} "
                      f"RealMemory={_mem_mb()} State=UNKNOWN" for n, p in zip(NODES, ports[1:]))
    conf = root / "slurm.conf"
    conf.write_text(f"""# written by tests/slurm/conftest.py
ClusterName=mmertest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={root}/ctld
SlurmctldPidFile={root}/ctld/slurmctld.pid
SlurmctldLogFile={root}/ctld/slurmctld.log
SlurmdSpoolDir={root}/%n
SlurmdPidFile={root}/%n/slurmd.pid
SlurmdLogFile={root}/%n/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=10
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""", encoding="utf-8")
    return conf


def _parse_job_line(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o`: Key=Value pairs (values may hold spaces)."""
    return dict(re.findall(r"(\w[\w:/]*)=(.*?)(?= \w[\w:/]*=|$)", line.strip()))


@dataclass
class Cluster:
    """A running test cluster: its folder, config and the environment every command gets."""

    root: Path
    conf: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    history: dict[str, list[str]] = field(default_factory=dict)

    def run(self, *argv: str, check: bool = True, timeout: float = 60, cwd: Path | None = None) -> str:
        res = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout,
                             cwd=cwd or REPO)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def sbatch(self, *args: str, cwd: Path | None = None) -> str:
        """Submit; the job id (`--parsable`)."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd).strip().split(";")[0]

    def jobs(self, job: str) -> list[dict[str, str]]:
        """`scontrol show job -o JOB`: one dict per job (array elements separately); every change of
        state, reason or restart count is appended to `history[JOB]` (what the tests print)."""
        out = self.run("scontrol", "show", "job", "-o", job)
        jobs = [_parse_job_line(line) for line in out.splitlines() if line.strip()]
        seen = self.history.setdefault(job, [])
        now = " ".join(f"{j.get('ArrayTaskId', j['JobId'])}:{j['JobState']}/{j.get('Reason')}/restarts={j.get('Restarts')}"
                       for j in jobs)
        if not seen or seen[-1] != now:
            seen.append(now)
        return jobs

    def state(self, job: str) -> str:
        return self.jobs(job)[0]["JobState"]

    def wait(self, job: str, timeout: float = 240, release: bool = True) -> list[dict[str, str]]:
        """Wait until every element of `job` is in a final state; requeued ones are released."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.jobs(job)
            if all(j["JobState"] in FINAL for j in jobs):
                return jobs
            if release:
                for j in jobs:
                    self.release(j)
            time.sleep(0.3)
        raise TimeoutError(f"job {job} not finished after {timeout} s: {[j['JobState'] for j in self.jobs(job)]}")

    def release(self, job: dict[str, str]) -> bool:
        """Start a requeued job now instead of 120 s later (see the module docstring), once every process
        of its previous run has ended: that is what the delay waits for (an earlier start would let the
        old batch script's exit status land on the new run)."""
        if job["JobState"] != "PENDING" or job.get("Reason") != "BeginTime" or int(job.get("Restarts", "0")) == 0:
            return False
        if job_processes(self.conf, job["JobId"]):
            return False
        time.sleep(1.0)                      # slurmd reports the old run's end to slurmctld
        if job_processes(self.conf, job["JobId"]):
            return False
        self.run("scontrol", "update", f"JobId={job['JobId']}", "StartTime=now", check=False)
        return True

    def queue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").split()

    def cancel_all(self, timeout: float = 60) -> None:
        ids = self.queue()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.time() + timeout
        while self.queue() and time.time() < deadline:
            time.sleep(0.5)


def job_processes(conf: Path, job_id: str) -> list[int]:
    """Live processes of job `job_id` of the cluster configured by `conf`: its slurmstepds (started by our
    slurmd, so they carry our SLURM_CONF) and whatever they started."""
    stepd, job, ours = f"slurmstepd: [{job_id}.".encode(), f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CONF={conf}".encode()
    found = []
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit():
                continue
            env = (d / "environ").read_bytes().split(b"\0")
            if ours in env and ((d / "cmdline").read_bytes().startswith(stepd) or job in env) and _alive(int(d.name)):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def _start(cluster: Cluster, name: str, argv: list[str]) -> None:
    log = open(cluster.root / f"{name}.console", "wb")
    cluster.procs[name] = subprocess.Popen(argv, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)


def _start_munge(cluster: Cluster) -> None:
    d = cluster.root / "munge"
    d.mkdir(mode=0o755)
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    _start(cluster, "munged", ["munged", "--foreground", f"--socket={d}/munge.sock", f"--key-file={key}",
                               f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                               f"--seed-file={d}/munged.seed"])
    _wait_for(lambda: (d / "munge.sock").exists(), 20, cluster, "munged socket")


def _wait_for(ready, timeout: float, cluster: Cluster, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        dead = [f"{n} exited {p.returncode}" for n, p in cluster.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"test cluster: {', '.join(dead)} before {what}\n{_logs(cluster)}")
        time.sleep(0.2)
    raise RuntimeError(f"test cluster: {what} not ready after {timeout} s\n{_logs(cluster)}")


def _logs(cluster: Cluster) -> str:
    parts = []
    for p in sorted(cluster.root.rglob("*.log")) + sorted(cluster.root.glob("*.console")):
        tail = p.read_text(errors="replace").splitlines()[-15:]
        parts.append(f"--- {p}\n" + "\n".join(tail))
    return "\n".join(parts)


def _nodes_idle(cluster: Cluster) -> bool:
    out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
    states = dict(line.split() for line in out.splitlines() if line.strip())
    return all(states.get(n) == "idle" for n in NODES)


def make_cluster(root: Path) -> Cluster:
    """The folder layout, slurm.conf on free ports, and the environment of every command."""
    ports = _free_ports(1 + len(NODES))
    (root / "ctld").mkdir()
    for n in NODES:
        (root / n).mkdir()
    conf = write_conf(root, ports)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(conf), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin:/sbin",
               PYTHONPATH=f"{REPO}:{env.get('PYTHONPATH', '')}".rstrip(":"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return Cluster(root, conf, env)


def start_daemons(cluster: Cluster) -> None:
    """munged, slurmctld, then one slurmd per node, all in the foreground (their pids are ours)."""
    _start_munge(cluster)
    _start(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(cluster.conf)])
    for n in NODES:
        _start(cluster, n, ["slurmd", "-D", "-N", n, "-f", str(cluster.conf)])
    _wait_for(lambda: _nodes_idle(cluster), 60, cluster, "both nodes idle in sinfo")


def _cluster_pids(root: Path, own: set[int]) -> list[int]:
    """Processes (besides `own`) whose command line or environment names the cluster's folder."""
    found = []
    needle = str(root).encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in own or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "cmdline").read_bytes() or needle in (d / "environ").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


def stop_cluster(cluster: Cluster) -> list[int]:
    """Cancel every job, stop our daemons by pid (nodes first), return the pids of any leftover process."""
    try:
        cluster.cancel_all()
    except Exception as e:  # the controller may be gone already; the daemons still get stopped
        print(f"test cluster: cancelling jobs failed: {e}", file=sys.stderr)
    for name in [*NODES, "slurmctld", "munged"]:
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    time.sleep(0.5)
    return [pid for pid in _cluster_pids(cluster.root, set()) if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def slurm() -> Cluster:
    missing = [b for b in BINARIES if shutil.which(b, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None]
    if missing:
        pytest.skip(f"Slurm binaries not found: {', '.join(missing)} (install with `apt-get install -y slurm-wlm "
                    f"munge`; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("tests/slurm start slurmd, which launches jobs as root here; run them as root (CI does)")
    root = Path(tempfile.mkdtemp(prefix="mmer-slurm-"))    # short: munge's socket path must fit in 108 bytes
    root.chmod(0o755)                                       # munged wants its socket's folders traversable
    cluster = make_cluster(root)
    try:
        start_daemons(cluster)
        yield cluster
    finally:
        leftovers = stop_cluster(cluster)
        for pid in leftovers:                               # ours (they name our folder): end them, then fail
            os.kill(pid, signal.SIGKILL)
        if leftovers:
            pytest.fail(f"processes of the test cluster outlived it: {leftovers} (logs kept in {root})")
        shutil.rmtree(root, ignore_errors=True)
