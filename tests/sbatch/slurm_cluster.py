"""A real single-node Slurm for the tests, started the way a test suite starts a database.

munged, slurmctld and slurmd run from a temporary folder (their own slurm.conf through SLURM_CONF, munge socket
and key, free ports, state and spool folders), so nothing under /etc is read or changed; ``stop()`` ends exactly
the processes ``start()`` started, by the ids in their pid files. Slurm and munge are installed from Debian's
packages when absent and the tests run as root; otherwise ``unavailable()`` says why. pytest-xdist workers
share one instance (``shared``): the first starts it, the last one out stops it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ("slurmctld", "slurmd", "munged")


def unavailable() -> str | None:
    """None when Slurm and munge are here (installing them when absent and allowed), else the reason."""
    if all(shutil.which(d) or os.path.exists(f"/usr/sbin/{d}") for d in DAEMONS):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "slurm-wlm and munge are not installed and cannot be (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode:
            return f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


class SlurmCluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.state_dir = os.path.join(root, "state")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.pid_files = {d: os.path.join(root, f"{d}.pid") for d in DAEMONS}

    def sbin(self, name):
        return shutil.which(name) or f"/usr/sbin/{name}"

    def start(self, timeout: float = 90) -> None:
        os.makedirs(os.path.join(self.root, "spool"), exist_ok=True)
        os.makedirs(self.state_dir, exist_ok=True)
        key, sock = os.path.join(self.root, "munge.key"), os.path.join(self.root, "munge.sock")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        host = socket.gethostname().split(".")[0]
        r = self.root
        settings = dict(
            ClusterName="fdltest", SlurmctldHost=host, SlurmUser="root", SlurmdUser="root",
            SlurmctldPort=_free_port(), SlurmdPort=_free_port(), AuthType="auth/munge",
            AuthInfo=f"socket={sock}", StateSaveLocation=self.state_dir, SlurmdSpoolDir=f"{r}/spool",
            SlurmctldPidFile=self.pid_files["slurmctld"], SlurmdPidFile=self.pid_files["slurmd"],
            SlurmctldLogFile=f"{r}/slurmctld.log", SlurmdLogFile=f"{r}/slurmd.log",
            ProctrackType="proctrack/linuxproc", TaskPlugin="task/none", SelectType="select/cons_tres",
            SelectTypeParameters="CR_Core", ReturnToService=2, MpiDefault="none", SchedulerType="sched/builtin",
            JobAcctGatherType="jobacct_gather/none", AccountingStorageType="accounting_storage/none",
            MinJobAge=600, SlurmdTimeout=30, InactiveLimit=0, KillWait=5)
        with open(self.conf, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in settings.items())
            f.write(f"NodeName={host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN\n")
            f.write("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")
        self._run([self.sbin("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
                   f"--pid-file={self.pid_files['munged']}", f"--log-file={r}/munged.log",
                   f"--seed-file={r}/munge.seed"])
        self._run([self.sbin("slurmctld"), "-i"])
        self._run([self.sbin("slurmd")])
        self.wait(lambda: self.sinfo() == "idle", timeout, "the node to show idle in sinfo")

    def _run(self, cmd):
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()} "
                               f"(logs in {self.root})")

    def sinfo(self) -> str:
        res = subprocess.run(["sinfo", "--noheader", "--format=%t"], env=self.env, capture_output=True, text=True,
                             timeout=30)
        return res.stdout.strip()

    def wait(self, ready, timeout: float, what: str, every: float = 0.5):
        """Poll READY until true; after TIMEOUT fail naming WHAT and the node's state (drained, down, ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}; node state: {self.sinfo() or 'unknown'} "
                           f"(logs in {self.root})")

    def jobs(self, user_filter: str = "") -> dict[str, tuple[str, str]]:
        """{job id: (name, state)} of every job the controller still knows, finished ones included."""
        res = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%j|%T"], env=self.env,
                             capture_output=True, text=True, timeout=30)
        out = {}
        for line in res.stdout.splitlines():
            jid, name, st = line.strip().split("|")
            if user_filter in name:
                out[jid] = (name, st)
        return out

    def stored_job_files(self) -> dict[str, str]:
        """{path: text} of every job's stored environment and script in slurmctld's state folder."""
        out = {}
        for d, _, files in os.walk(self.state_dir):
            for f in files:
                if f in ("environment", "script"):
                    with open(os.path.join(d, f), "rb") as fh:
                        out[os.path.join(d, f)] = fh.read().decode("utf-8", "replace")
        return out

    def stop(self) -> None:
        if _alive(_pid(self.pid_files["slurmctld"])):
            subprocess.run(["scancel", "--state=PENDING,RUNNING,SUSPENDED", "--full", "--quiet", "--user=root"],
                           env=self.env, capture_output=True, timeout=30)
            with contextlib.suppress(TimeoutError):
                self.wait(lambda: not any(s in ("RUNNING", "COMPLETING", "PENDING")
                                          for _, s in self.jobs().values()), 30, "jobs to end")
        for d in DAEMONS:
            pid = _pid(self.pid_files[d])
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 15
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def shared(base: str):
    """One cluster for every pytest-xdist worker of a session: state in BASE/slurm.json under BASE/slurm.lock,
    counting its users; the first user starts it, the last one stops it."""
    os.makedirs(base, exist_ok=True)
    lock_path, state_path = os.path.join(base, "slurm.lock"), os.path.join(base, "slurm.json")

    def locked():
        f = open(lock_path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    with locked():
        try:
            with open(state_path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = None
        cluster = SlurmCluster(state["root"]) if state else None
        if cluster is None or not _alive(_pid(cluster.pid_files["slurmctld"])):
            root = os.path.join(base, f"slurm-{os.getpid()}")
            cluster, state = SlurmCluster(root), {"root": root, "users": 0}
            try:
                cluster.start()
            except Exception:
                cluster.stop()
                raise
        state["users"] += 1
        with open(state_path, "w") as f:
            json.dump(state, f)
    try:
        yield cluster
    finally:
        with locked():
            with open(state_path) as f:
                state = json.load(f)
            state["users"] -= 1
            if state["users"] <= 0:
                cluster.stop()
                os.unlink(state_path)
            else:
                with open(state_path, "w") as f:
                    json.dump(state, f)
