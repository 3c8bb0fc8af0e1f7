"""A real SLURM cluster of two logical nodes on this host, for the launcher's tests.

Debian's slurmctld / slurmd (installed by `make cluster-deps`) run as root with every state, spool,
log and pid file in one folder; the nodes are ctvlpn1 / ctvlpn2 at 127.0.1.11 / 127.0.1.12 (added
once to /etc/hosts), each its own slurmd (`slurmd -N`). munged runs as the munge user, as the
package expects. Not mocked: jobs go through sbatch, the controller, both slurmds and srun.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = {"ctvlpn1": "127.0.1.11", "ctvlpn2": "127.0.1.12"}
CTLD_PORT, SLURMD_PORTS = 16917, (17101, 17102)
CPUS_PER_NODE = 4  # logical: four jobs of one CPU per node run at once
DAEMONS = ("slurmctld", "slurmd", "munged", "scontrol", "sbatch")


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "the SLURM daemons need root (slurmd starts jobs as their user); run the tests as root"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"{', '.join(absent)} not installed: `make cluster-deps` installs Debian's slurm and munge"
    return None


def _hosts() -> None:
    """Name the logical nodes once (idempotent): jobs resolve them with getent, like real nodes."""
    text = Path("/etc/hosts").read_text()
    add = [f"{ip} {name}" for name, ip in NODES.items() if not any(
        line.split()[1:2] == [name] for line in text.splitlines() if line.strip())]
    if add:
        with open("/etc/hosts", "a") as f:
            f.write(("" if text.endswith("\n") else "\n") + "\n".join(add) + "\n")


def _conf(d: Path) -> str:
    nodes = "\n".join(f"NodeName={n} NodeAddr={ip} Port={p} CPUs={CPUS_PER_NODE} RealMemory=8000 State=UNKNOWN"
                      for (n, ip), p in zip(NODES.items(), SLURMD_PORTS))
    return f"""ClusterName=ctvlptest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=20
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """start() returns once both nodes are idle; stop() ends every daemon by its pid file."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def start(self, timeout: float = 90) -> "SlurmCluster":
        why = missing()
        if why:
            raise RuntimeError(why)
        _hosts()
        (self.dir / "state").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_conf(self.dir))
        self._munge()
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True)
        for name in NODES:
            (self.dir / f"spool-{name}").mkdir(exist_ok=True)
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", name], env=self.env, check=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
            if len(states) == len(NODES) and all(s == "idle" for s in states.values()):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes not idle after {timeout:.0f} s: {p.stdout} {p.stderr}\n"
                           + self.log("slurmctld")[-3000:])

    def _munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already up (an earlier session, or the host's)
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        for _ in range(50):
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not answer")

    def log(self, name: str) -> str:
        p = self.dir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        pids = [self.dir / "slurmctld.pid", *(self.dir / f"slurmd-{n}.pid" for n in NODES)]
        alive = []
        for f in pids:
            try:
                pid = int(f.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                alive.append(pid)
            except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
                pass
        deadline = time.time() + 20
        while alive and time.time() < deadline:
            alive = [p for p in alive if _exists(p)]
            time.sleep(0.2)
        for p in alive:
            os.kill(p, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
