"""A private single-node SLURM for tests: munged + slurmctld + slurmd, state under a temporary folder.

``private_slurm`` starts the three daemons in the foreground as child processes (so they are
stopped by PID, never by name), on free ports, with a configuration that needs neither systemd nor
cgroups nor accounting (``proctrack/linuxproc``, ``task/none``, ``jobacct_gather/none``), and yields
a :class:`Slurm` whose ``env`` points the client commands (``sbatch``, ``squeue``, ``scontrol``)
at it. Without the programs the tests skip naming the Debian packages ``slurm-wlm`` and ``munge``
(CI installs them and fails instead: ``tests.helpers.system_tools``).

Facts this rests on (slurm-wlm 22.05, munge 0.5): munged refuses a socket folder that is not
world-executable all the way up (``mkdtemp`` makes 0700 folders, so the folder is opened up), and a
key that is not 0600; ``scontrol requeue`` holds a task until ``now + 120 s`` unless followed by
``scontrol update JobId=... StartTime=now`` (:meth:`Slurm.release`), which must come a second or more
after the kill, else slurmd refuses the relaunch and the task fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers.system_tools import REQUIRE_ENV, require_programs

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = ("slurm-wlm", "munge")
START_TIMEOUT_S = 60.0
KILL_TO_RELAUNCH_S = 2.0
"""Seconds between a task's kill and its relaunch (slurmd compares credential times in whole seconds)."""


def missing_tool(reason: str) -> None:
    """The daemons are installed but cannot run here: skip, or fail where the tools are required (CI)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 makes this a failure", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def slurm_conf(folder: Path, cpus: int) -> str:
    return f"""ClusterName=lare2test
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    """A running private SLURM: its folder, and the environment for client commands."""

    folder: Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}\n"
                                 + self.logs())
        return done.stdout

    def tasks(self, job_id: str) -> dict[str, str]:
        """``{"<job>_<task>": state}`` of the job's array tasks (finished ones as long as SLURM remembers them)."""
        states = {}
        for line in self.run("scontrol", "show", "job", job_id, "--oneliner", check=False).splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if "ArrayTaskId" in fields:
                states[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = fields["JobState"]
        return states

    def queued(self, job_id: str) -> list[str]:
        """Tasks of the job still pending or running (``squeue``)."""
        return self.run("squeue", "-h", "-r", "-j", job_id, "-o", "%i", check=False).split()

    def wait_until_done(self, job_id: str, timeout_s: float) -> dict[str, str]:
        """Wait until no task of the job is queued; their final states."""
        deadline = time.monotonic() + timeout_s
        while self.queued(job_id):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still queued after {timeout_s:.0f} s: {self.tasks(job_id)}\n"
                                     + self.logs())
            time.sleep(0.5)
        return self.tasks(job_id)

    def release(self, task: str, timeout_s: float = 60.0) -> None:
        """Once a requeued task (``<job>_<index>``) is pending, let it start now rather than in 120 s."""
        deadline = time.monotonic() + timeout_s
        while self.tasks(task.split("_")[0]).get(task) != "PENDING":
            if time.monotonic() > deadline:
                raise AssertionError(f"{task} not pending after requeue: {self.tasks(task.split('_')[0])}")
            time.sleep(0.2)
        # slurmd refuses to launch a job whose credential is not newer than its kill, compared in whole seconds
        # ("Job N already killed, do not launch batch job": the task fails); the 120 s hold exists for that
        time.sleep(KILL_TO_RELAUNCH_S)
        self.run("scontrol", "update", f"JobId={task}", "StartTime=now")

    def logs(self, lines: int = 15) -> str:
        parts = []
        for log in sorted((self.folder / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _start(slurm: Slurm, name: str, command: list[str]) -> None:
    log = open(slurm.folder / "log" / f"{name}.out", "w")
    slurm.daemons[name] = subprocess.Popen(command, env=slurm.env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)
    log.close()


def _wait_for(slurm: Slurm, what: str, ready) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        dead = [name for name, process in slurm.daemons.items() if process.poll() is not None]
        if dead or time.monotonic() > deadline:
            _stop(slurm)
            missing_tool(f"a private SLURM did not start ({what}; exited: {dead or 'none'}):\n{slurm.logs()}")
        time.sleep(0.2)


def _stop(slurm: Slurm) -> None:
    """Cancel every job, then stop the daemons by PID (newest first)."""
    if "slurmctld" in slurm.daemons and slurm.daemons["slurmctld"].poll() is None:
        subprocess.run(["scancel", "--user", str(os.getuid())], env=slurm.env, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while slurm.run("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
            time.sleep(0.5)
    for name in reversed(list(slurm.daemons)):
        process = slurm.daemons[name]
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)


@pytest.fixture(scope="module")
def private_slurm() -> Iterator[Slurm]:
    """A single-node SLURM of this machine's CPUs, started for the module and stopped after it."""
    programs = require_programs(*PROGRAMS, packages=PACKAGES)
    if os.geteuid() != 0:
        missing_tool("a private SLURM needs root here: slurmd starts each job as the user who submitted it")
    # munged wants every folder above its socket world-executable; mkdtemp makes 0700 folders
    folder = Path(tempfile.mkdtemp(prefix="lare2-slurm-", dir="/tmp"))
    folder.chmod(0o755)
    for sub in ("munge", "state", "spool", "log"):
        (folder / sub).mkdir()
    (folder / "munge").chmod(0o755)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, os.cpu_count() or 1))
    slurm = Slurm(folder=folder, env={**os.environ, "SLURM_CONF": str(conf)})
    try:
        _start(slurm, "munged", [programs["munged"], "--foreground", "--force", f"--socket={folder}/munge/munge.socket",
                                 f"--key-file={key}", f"--pid-file={folder}/munge/munged.pid",
                                 f"--seed-file={folder}/munge/munged.seed", f"--log-file={folder}/log/munged.log"])
        _wait_for(slurm, "munged", lambda: (folder / "munge" / "munge.socket").exists())
        _start(slurm, "slurmctld", [programs["slurmctld"], "-D", "-i", "-f", str(conf)])
        _start(slurm, "slurmd", [programs["slurmd"], "-D", "-f", str(conf), "-N", "localhost"])
        _wait_for(slurm, "the node is not idle", lambda: "idle" in slurm.run("sinfo", "-h", "-o", "%T", check=False))
        yield slurm
    finally:
        _stop(slurm)
        shutil.rmtree(folder, ignore_errors=True)
