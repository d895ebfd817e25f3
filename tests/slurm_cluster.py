"""A real one-node SLURM cluster on loopback, for tests/test_slurm.py.

Installs Debian's `slurm-wlm` and `munge` with apt-get when they are
missing, writes a slurm.conf under a temporary directory, starts `munged`,
`slurmctld` and `slurmd` without systemd and stops them by PID. Clients
(`srun`, `scancel`, `squeue`) find the cluster through the `SLURM_CONF`
variable of `Slurm.env`. Every failure is a `SlurmUnavailable` with one
line saying what could not be done.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

PACKAGES = ("slurm-wlm", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "srun", "scancel", "squeue")
# Debian's munge package makes this key when it installs.
MUNGE_KEY = "/etc/munge/munge.key"

SLURM_CONF = """\
ClusterName=ringloss
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
KillWait=60
InactiveLimit=0
MinJobAge=300
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP \
OverSubscribe=FORCE:4
"""


class SlurmUnavailable(RuntimeError):
    """SLURM could not be installed or started (one line)."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install():
    """Installs `slurm-wlm` and `munge` with apt-get unless every program
    is already there."""
    if all(shutil.which(p) or os.path.exists(f"/usr/sbin/{p}")
           for p in PROGRAMS):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", *PACKAGES]):
        try:
            result = subprocess.run(command, env=env, capture_output=True,
                                    text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SlurmUnavailable(
                f"`{' '.join(command)}` could not run: {error}") from None
        if result.returncode:
            last = (result.stderr or result.stdout).strip().splitlines()
            raise SlurmUnavailable(
                f"`{' '.join(command)}` failed ({result.returncode}): "
                f"{last[-1] if last else 'no output'}")


class Slurm:
    """The daemons of a one-node cluster whose files are under `root`."""

    def __init__(self, root, cpus=2):
        self.root = str(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_dir = os.path.join(self.root, "munge")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self._pid_files = []

    def _daemon(self, name, command, pid_file):
        try:
            result = subprocess.run(command, env=self.env,
                                    capture_output=True, text=True,
                                    timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SlurmUnavailable(f"{name} could not start: {error}") \
                from None
        self._pid_files.append(pid_file)
        if result.returncode:
            raise SlurmUnavailable(
                f"{name} did not start ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-300:]}")
        for _ in range(100):
            if os.path.exists(pid_file) and os.path.getsize(pid_file):
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"{name} started but wrote no PID file "
                               f"({pid_file}); see its log under {self.root}")

    def start(self):
        """Starts munged, slurmctld and slurmd; waits until the node is
        idle."""
        try:
            socket.gethostbyname(self.host)
        except OSError:
            raise SlurmUnavailable(
                f"this machine's host name {self.host!r} does not resolve; "
                "add it to /etc/hosts") from None
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(self.munge_dir, 0o700)
        key = os.path.join(self.munge_dir, "munge.key")
        try:
            shutil.copyfile(MUNGE_KEY, key)
        except OSError as error:
            raise SlurmUnavailable(f"no munge key to copy: {error}") \
                from None
        os.chmod(key, 0o600)
        munge_socket = os.path.join(self.munge_dir, "socket")
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(
                host=self.host, root=self.root, cpus=self.cpus,
                ctld_port=_free_port(), slurmd_port=_free_port(),
                munge_socket=munge_socket))
        pid = os.path.join(self.munge_dir, "munged.pid")
        # --force: munged runs as root here, with its files in a root-owned
        # temporary directory it would otherwise refuse.
        self._daemon("munged", [
            "munged", "--force", f"--key-file={key}",
            f"--socket={munge_socket}", f"--pid-file={pid}",
            f"--log-file={self.munge_dir}/munged.log",
            f"--seed-file={self.munge_dir}/munged.seed"], pid)
        self._daemon("slurmctld", ["slurmctld", "-i", "-f", self.conf],
                     os.path.join(self.root, "slurmctld.pid"))
        self._daemon("slurmd", ["slurmd", "-f", self.conf],
                     os.path.join(self.root, "slurmd.pid"))
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=self.env,
                capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise SlurmUnavailable(
            f"the node did not become idle within 60 s (state "
            f"{state!r}); see {self.root}/slurmctld.log and slurmd.log")

    def stop(self):
        """Stops the daemons by the PIDs they wrote, newest first."""
        for pid_file in reversed(self._pid_files):
            try:
                with open(pid_file) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        self._pid_files = []

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False
