"""A real one-node SLURM cluster on this machine, for tests of launch/slurm/.

Debian's slurm-wlm and munge (installed with apt-get when absent), a fresh munge key and `munged`, then
`slurmctld` and `slurmd` with one node = this host (`NodeName=<hostname -s> CPUs=<nproc>`). Everything they
write (key, sockets, state, spool, pid and log files) lives in one temporary directory, the ports are
free non-default ones, and the daemons run in the foreground as children of the test process, so
`stop()` ends exactly what `start()` began. The configuration is the one docs/SLURM.md reports working
here: munge auth, proctrack/linuxproc, task/none, select/cons_tres with CR_Core, no accounting.

Needs root (slurmd starts jobs as their users; munged and slurmd refuse otherwise). Anything that keeps
the cluster from coming up raises `SlurmUnavailable` with the reason, for the caller to skip on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
APT_PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run on this machine; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def wait_for(predicate, timeout: float, what: str, on_timeout=lambda: ""):
    """The predicate's first true value, polled every 0.5 s; past the timeout an AssertionError that
    says what was awaited, with on_timeout()'s diagnostics."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{on_timeout()}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(none)"


def ensure_installed(timeout: float = 900) -> None:
    """Install slurm-wlm and munge with apt-get unless their daemons and clients are already here."""
    if all(_find(n) for n in DAEMONS + CLIENTS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and installing them needs root")
    if not _find("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    missing = [n for n in DAEMONS + CLIENTS if not _find(n)]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(APT_PACKAGES)} but {missing} are still missing")


class SlurmCluster:
    """One-node cluster rooted at `root` (an empty directory). Use as a context manager or start()/stop()."""

    def __init__(self, root: str | Path, partition: str = "ci"):
        self.root = Path(root)
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]  # what `hostname -s` prints
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = self.root / "log"
        self._procs: dict[str, subprocess.Popen] = {}

    # --- environment for clients -------------------------------------------------------------
    def env(self, **extra: str) -> dict:
        """os.environ plus what SLURM's clients need to reach this cluster (sbatch passes it on to jobs)."""
        env = dict(os.environ)
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            del env[key]  # a surrounding allocation must not leak into ours
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=kwargs.pop("env", None) or self.env(), capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n"
                               f"{self.daemon_logs()}")
        return proc

    def job_state(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        fields = {}
        for word in proc.stdout.split():
            key, sep, value = word.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def daemon_logs(self) -> str:
        return "\n".join(f"--- {name} log (tail)\n{_tail(self.logs / f'{name}.log')}" for name in DAEMONS)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("the SLURM daemons need root (slurmd launches jobs as their users)")
        ensure_installed()
        for sub in ("munge", "log", "state", "spool", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged checks that no directory above its files is world-writable
        os.chmod(self.root / "munge", 0o755)  # clients need to reach the socket; the key stays 0400
        try:
            self._start_munge(timeout)
            self._write_conf()
            self._spawn("slurmctld", [_find("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [_find("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.logs / f"{name}.stdout", "w")
        self._procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=self.env(), cwd=self.root)
        out.close()

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with {proc.returncode} while starting:\n"
                                       f"{_tail(self.logs / f'{name}.stdout')}\n{self.daemon_logs()}")

    def _start_munge(self, timeout: float) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", [
            _find("munged"), "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--seed-file={self.root / 'munge' / 'seed'}",
            f"--log-file={self.logs / 'munged.log'}"])
        deadline = time.monotonic() + timeout
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not create {self.munge_socket}:\n{self.daemon_logs()}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(f"""\
# One-node test cluster written by tests/slurm_cluster.py
ClusterName=glm5test
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmdPidFile={r / 'run' / 'slurmd.pid'}
SlurmctldLogFile={self.logs / 'slurmctld.log'}
SlurmdLogFile={self.logs / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            proc = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False, timeout=10)
            state = proc.stdout.strip()
            if proc.returncode == 0 and state == "idle":
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"node {self.node} is not idle after {timeout:.0f} s (state {state!r}):\n"
                               f"{self.daemon_logs()}")

    def stop(self) -> None:
        """Cancel every job, then end the daemons this object started (slurmd, slurmctld, munged)."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--partition", self.partition, check=False, timeout=20)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                proc = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
