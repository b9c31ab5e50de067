"""A throw-away single-node Slurm cluster for tests: munged, slurmctld and slurmd started with their
configuration, state, sockets and logs in one temporary folder, on free ports, without accounting (as
many small clusters run), and stopped by PID afterwards.

Debian's ``slurm-wlm`` and ``munge`` come from ``scripts/install_slurm.sh`` when missing. Daemons run as
root (slurmd must, to start jobs); where that or the installation is not possible the cluster cannot
start and :class:`ClusterUnavailable` says why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be started on this machine (not root, packages not installable, daemons failing)."""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


class SlurmCluster:
    """``start()`` brings the cluster up (``SLURM_CONF`` set in this process, so jobs and clients find
    it); ``stop()`` cancels what is left and stops the daemons."""

    partition = "debug"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cpq-slurm-"))
        self.root.chmod(0o755)  # munged refuses a socket folder others cannot traverse
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self._saved_conf = os.environ.get("SLURM_CONF")
        self.conf = self.root / "slurm.conf"

    def _path(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _write_config(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text("\n".join([
            "ClusterName=cpqtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.root / 'run' / 'munge.socket'},cred_expire=5",  # requeued jobs wait this long
            f"StateSaveLocation={self._path('state', 'x').parent}",
            f"SlurmdSpoolDir={self._path('spool', 'x').parent}",
            f"SlurmctldPidFile={self._path('run', 'slurmctld.pid')}",
            f"SlurmdPidFile={self._path('run', 'slurmd.pid')}",
            f"SlurmctldLogFile={self._path('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self._path('log', 'slurmd.log')}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2,bf_interval=2", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30", "KillWait=5", "MinJobAge=300",
            "JobRequeue=1",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb() // 2} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def _install(self) -> None:
        if all(shutil.which(tool) for tool in TOOLS):
            return
        result = subprocess.run([str(REPO / "scripts" / "install_slurm.sh")], capture_output=True, text=True)
        if result.returncode != 0 or not all(shutil.which(tool) for tool in TOOLS):
            raise ClusterUnavailable(f"Slurm is not installed and scripts/install_slurm.sh failed: "
                                     f"{(result.stderr or result.stdout).strip()[-400:]}")

    def start(self, timeout_s: float = 30.0) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise ClusterUnavailable("a test Slurm cluster needs root (slurmd starts jobs as their users)")
        self._install()
        self._write_config()
        key = self._path("munge", "munge.key")
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        key.parent.chmod(0o700)
        run = self.root / "run"
        run.chmod(0o755)
        self._daemon(["munged", f"--key-file={key}", f"--socket={run / 'munge.socket'}",
                      f"--pid-file={run / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                      f"--seed-file={self.root / 'munge' / 'seed'}"])
        os.environ["SLURM_CONF"] = str(self.conf)
        self._daemon(["slurmctld", "-f", str(self.conf)])
        self._daemon(["slurmd", "-f", str(self.conf), "-N", self.node])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
            if "idle" in states:
                return self
            time.sleep(0.2)
        self.stop()
        raise ClusterUnavailable(f"the test Slurm node did not become idle within {timeout_s:.0f} s:\n{self.logs()}")

    def _daemon(self, command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            logs = self.logs()
            self.stop()
            raise ClusterUnavailable(f"{command[0]} did not start ({result.stderr.strip()}):\n{logs}")

    def logs(self, lines: int = 15) -> str:
        text = []
        for log in sorted((self.root / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            text.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(text)

    def queue(self) -> list[tuple[str, str]]:
        """(job id, state) of every job slurmctld still lists."""
        out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T"], capture_output=True, text=True).stdout
        return [tuple(line.split("|", 1)) for line in out.splitlines() if "|" in line]

    def cancel_all(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True)

    def stop(self) -> None:
        if self.conf.exists() and shutil.which("scancel"):
            self.cancel_all()
        pids = []
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                pids.append(int((self.root / "run" / f"{name}.pid").read_text().strip()))
            except (OSError, ValueError):
                continue
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):  # all at once, then whoever is left
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                pids = [pid for pid in pids if _alive(pid)]
                time.sleep(0.1)
            if not pids:
                break
        if self._saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._saved_conf
        shutil.rmtree(self.root, ignore_errors=True)
