"""A real SLURM cluster for tests, of one node or two, from Debian's packages (installed by tests/install-slurm.sh).

`SlurmCluster(workdir)` runs munged, a private MariaDB, slurmdbd, slurmctld and slurmd as root without
systemd, all on free loopback ports with their configs, sockets, state and logs under `workdir`: it never
touches a system SLURM, munge or MariaDB, and two clusters can run side by side. Clients and subprocesses
need `cluster.env` (`SLURM_CONF`); the session fixture `slurm_cluster` exports it to the test process.

The configuration (DESIGN §5):
- one node named after `hostname -s`, with the machine's real CPUs and memory (`cpus` may declare more:
  `SlurmdParameters=config_overrides` keeps such a node in service); with `nodes=2`, a second node named
  `localhost` (both names resolve here: a job's rendezvous address is its first node's name), each node its
  own slurmd on its own port with its own spool, sharing the machine's CPUs and memory;
- select/cons_tres over cores and memory, `DefMemPerCPU` (else a job takes all the memory), and each core
  shared by up to `oversubscribe` jobs (`OverSubscribe=FORCE:n`): several one-CPU jobs run at once;
- partition `debug` (default) is preemptible (`PreemptMode=REQUEUE`, `GraceTime`); a job in partition
  `urgent` takes a whole node (`OverSubscribe=EXCLUSIVE`) and preempts the `debug` jobs on it. At
  preemption a job gets its `--signal` (submitit: USR2) at once (`preempt_send_user_signal`), then after
  GraceTime SIGTERM, then after `KillWait` SIGKILL, and it is requeued;
- short `KillWait` and `cred_expire` and a scheduler that looks every second, so a requeued job runs
  again within seconds, not minutes; accounting through slurmdbd, as submitit polls `sacct`.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # in start order
SBIN = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # daemons live in sbin, not always on PATH


class SlurmCommandError(subprocess.CalledProcessError):
    """A failed SLURM client command; its message carries the command's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr.strip()}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1) -> object:
    """Poll `check` until it returns something truthy; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
    return value


def _die_with_parent() -> None:
    """Runs in each daemon's process before exec: SIGTERM it when the test process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class SlurmCluster:
    """A private single-node SLURM cluster: `start()` and `stop()`, or a context manager."""

    name = "hldx"

    def __init__(
        self,
        workdir: Path | str,
        cpus: int | None = None,
        oversubscribe: int = 4,
        kill_wait_s: int = 5,
        grace_time_s: int = 5,
        def_mem_per_cpu_mb: int = 512,
        nodes: int = 1,
    ) -> None:
        if nodes not in (1, 2):
            raise ValueError(f"nodes={nodes}: a test cluster has one node or two")
        self.root = Path(workdir).resolve()
        self.node = socket.gethostname().split(".")[0]
        self.nodes = [self.node, "localhost"][:nodes]
        self.cpus = cpus or os.cpu_count() or 1
        self.oversubscribe = oversubscribe
        self.kill_wait_s = kill_wait_s
        self.grace_time_s = grace_time_s
        self.def_mem_per_cpu_mb = def_mem_per_cpu_mb
        self.etc, self.log, self.var = self.root / "etc", self.root / "log", self.root / "var"
        self.munge_socket = self.var / "munge.socket"
        self.env = {"SLURM_CONF": str(self.etc / "slurm.conf")}
        self.startup_s: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._submits = 0

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> SlurmCluster:
        """Start every daemon and wait until the node is idle; on any failure, stop what was started."""
        needed = (*DAEMONS, "mariadb-install-db", "sbatch", "srun", "sacct")
        missing = [name for name in needed if not shutil.which(name, path=SBIN)]
        if missing:
            hint = "install them with `bash tests/install-slurm.sh`"
            raise RuntimeError(f"SLURM test cluster: {', '.join(missing)} not found; {hint}")
        if os.geteuid() != 0:
            raise RuntimeError("SLURM test cluster: its daemons run as root; run the tests as root")
        t0 = time.monotonic()
        try:
            for folder in (self.etc, self.log, self.var, self.root / "jobs"):
                folder.mkdir(parents=True, exist_ok=True)
            self._start_munge()
            self._start_mariadb()
            self._write_slurm_conf()
            self._start_slurmdbd()
            self._spawn("slurmctld", "-D", "-i")  # registers the cluster with slurmdbd
            self._wait("slurmctld to answer", lambda: self._ok("scontrol", "ping"))
            for node in self.nodes:
                (self.var / f"spool-{node}").mkdir(parents=True, exist_ok=True)
                self._spawn("slurmd", "-D", "-N", node, key=f"slurmd-{node}")
            for node in self.nodes:
                self._wait(f"node {node} to be idle", lambda n=node: self.node_state(n) == "idle", timeout_s=60)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Cancel all jobs, end the daemons (SIGTERM, then SIGKILL), kill what jobs left, drop all state.
        Configs, logs and job folders stay for a post-mortem."""
        if self._alive("slurmctld"):
            try:
                self.run("scancel", "--user=root")
                wait_until(
                    lambda: not self.run("squeue", "-h", "-o", "%i"), self.kill_wait_s + 10, "the jobs to end"
                )
            except (TimeoutError, subprocess.SubprocessError):
                pass  # whatever the jobs left is killed below
        for name in reversed([*DAEMONS[:-1], *(f"slurmd-{n}" for n in self.nodes)]):
            proc = self._procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._kill_job_processes()
        shutil.rmtree(self.var, ignore_errors=True)

    def run(self, *cmd: str, timeout_s: float = 30) -> str:
        """Run a SLURM client command against this cluster; its stdout (SlurmCommandError on failure)."""
        env = {**os.environ, **self.env}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if out.returncode:
            raise SlurmCommandError(out.returncode, cmd, out.stdout, out.stderr)
        return out.stdout.strip()

    def node_state(self, node: str | None = None) -> str:
        """The node's state (the first node's by default) as `sinfo` says it: idle, mixed, allocated, down*, ..."""
        states = self.run("sinfo", "-h", "-N", "-n", node or self.node, "-o", "%T")  # a line for each partition
        return states.splitlines()[0]

    def job_state(self, job_id: str) -> str:
        """A job's state as slurmctld knows it (`squeue`): PENDING, RUNNING, COMPLETED, ..."""
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T")

    def submit_dir(self, name: str = "job") -> Path:
        """A fresh folder for one submitit executor (job ids restart with each cluster: never reuse one)."""
        self._submits += 1
        return self.root / "jobs" / f"{self._submits:03d}-{name}"

    def _start_munge(self) -> None:
        key = self.var / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self._spawn(
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.var / 'munged.pid'}", f"--seed-file={self.var / 'munge.seed'}",
            f"--log-file={self.log / 'munged.log'}",
        )
        self._wait("munged's socket", self.munge_socket.exists)

    def _start_mariadb(self) -> None:
        datadir, self.db_port = self.var / "db", free_port()
        small = ["--innodb-log-file-size=8M", "--innodb-data-file-path=ibdata1:4M:autoextend"]
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root", "--skip-test-db",
             "--auth-root-authentication-method=normal", "--skip-name-resolve", *small],
            capture_output=True, check=True,
        )
        self._spawn(
            "mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root", "--bind-address=127.0.0.1",
            f"--port={self.db_port}", f"--socket={self.var / 'mariadb.sock'}", "--skip-name-resolve",
            "--skip-log-bin", "--innodb-buffer-pool-size=32M", *small,
            f"--pid-file={self.var / 'mariadb.pid'}", f"--log-error={self.log / 'mariadbd.log'}",
        )
        self._wait("MariaDB to listen", lambda: self._listening(self.db_port))

    def _start_slurmdbd(self) -> None:
        conf = self.etc / "slurmdbd.conf"  # slurmdbd looks for it beside $SLURM_CONF
        conf.write_text(
            f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
            f"DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={self.dbd_port}\nSlurmUser=root\n"
            f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={self.db_port}\n"
            "StorageUser=root\nStorageLoc=slurm_acct_db\n"
            f"PidFile={self.var / 'slurmdbd.pid'}\nLogFile={self.log / 'slurmdbd.log'}\n"
        )
        conf.chmod(0o600)  # slurmdbd refuses a config that others can read
        self._spawn("slurmdbd", "-D")
        self._wait("slurmdbd to listen", lambda: self._listening(self.dbd_port), timeout_s=60)

    def _write_slurm_conf(self) -> None:
        self.dbd_port, ctld_port, slurmd_port = free_port(), free_port(), free_port()
        mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024  # MemTotal, in kB, comes first
        share = f"OverSubscribe=FORCE:{self.oversubscribe}"
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",  # a requeued job waits 5 s, not 120
            f"AccountingStoragePass={self.munge_socket}",  # the munge socket used to talk to slurmdbd
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={self.dbd_port}",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            f"StateSaveLocation={self.var / 'state'}",
            f"SlurmdSpoolDir={self.var / 'spool-%n'}",  # %n: the node's name
            f"SlurmctldPidFile={self.var / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.var / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",  # look every second
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={self.def_mem_per_cpu_mb}",
            "SlurmdParameters=config_overrides",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "SlurmctldParameters=preempt_send_user_signal",
            f"KillWait={self.kill_wait_s}",
            *(f"NodeName={node} NodeAddr=127.0.0.1 Port={port} CPUs={max(1, self.cpus // len(self.nodes))} "
              f"RealMemory={mem_mb // len(self.nodes)} State=UNKNOWN"
              for node, port in zip(self.nodes, [slurmd_port, *(free_port() for _ in self.nodes[1:])])),
            f"PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE {share} PriorityTier=1 "
            f"PreemptMode=REQUEUE GraceTime={self.grace_time_s}",
            "PartitionName=urgent Nodes=ALL MaxTime=INFINITE OverSubscribe=EXCLUSIVE PriorityTier=2 "
            "PreemptMode=OFF",
        ]
        (self.etc / "slurm.conf").write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, *args: str, key: str | None = None) -> None:
        """Start daemon `name` (known as `key`, by default its name), its output in log/<key>.out."""
        key = key or name
        with open(self.log / f"{key}.out", "ab") as out:
            self._procs[key] = subprocess.Popen(
                [shutil.which(name, path=SBIN), *args], env={**os.environ, **self.env}, cwd=self.root,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _wait(self, what: str, check: Callable[[], object], timeout_s: float = 30) -> None:
        """Wait for `check`; fail at once, with its log, if a daemon dies meanwhile."""

        def ready() -> object:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    died = f"{name} exited ({proc.returncode}) before {what}"
                    raise RuntimeError(f"SLURM test cluster in {self.root}: {died}:\n{self._tail(name)}")
            return check()

        try:
            wait_until(ready, timeout_s, what)
        except TimeoutError as e:
            logs = "\n".join(self._tail(name) for name in self._procs)
            raise TimeoutError(f"SLURM test cluster in {self.root}: {e}\n{logs}") from None

    def _tail(self, name: str, lines: int = 15) -> str:
        logs = [self.log / f"{name}.log", self.log / f"{name}.out"]
        text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
        return f"--- {name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def _ok(self, *cmd: str) -> bool:
        try:
            self.run(*cmd, timeout_s=10)
        except subprocess.SubprocessError:
            return False
        return True

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def _kill_job_processes(self) -> None:
        """SIGKILL what the daemons leave behind: this cluster's job steps (slurmstepd) and job tasks."""
        conf = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                slurm_made = Path(f"/proc/{pid}/comm").read_text().startswith("slurm")
                if conf in env and (slurm_made or any(e.startswith(b"SLURM_JOB_ID=") for e in env)):
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass  # gone already


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One SLURM cluster for the test session, its `env` exported here (submitit runs sbatch and sacct)."""
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster, pytest.MonkeyPatch.context() as mp:
        for key, value in cluster.env.items():
            mp.setenv(key, value)
        yield cluster


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A two-node SLURM cluster beside the session's; a command reaches it with `env={**os.environ, **.env}`."""
    with SlurmCluster(tmp_path_factory.mktemp("slurm-2"), nodes=2) as cluster:
        yield cluster
