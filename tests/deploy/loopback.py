"""Machines on loopback for a real `ray up`: one SSH server per address, each a machine of its own.

Every machine (127.0.0.1 the head, 127.0.0.2, ...) is an ``sshd`` in its own PID and mount namespace: ``ray stop``
on one stops only that machine's Ray, and each has its own ``/tmp/ray`` and a copy-on-write ``/root`` (overlayfs:
what Ray writes to ``~`` lands in the work directory, never in the real home). All of them share one network
namespace of their own, so Ray's fixed ports (6379, 8265, 8000, ...) collide neither with the host's nor with other
tests' clusters, and nothing outside can reach them. The "laptop" that runs ``ray up`` is a process in that network
namespace with its own ``/tmp/ray`` and ``/root``. Stopping kills every namespace, whatever state Ray is in.

Needs root, ``/usr/sbin/sshd`` (Debian's openssh-server), ``rsync``, and util-linux's ``unshare``/``nsenter``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
TOOLS = ("unshare", "nsenter", "ip", "ssh", "ssh-keygen", "rsync")


def unavailable() -> str | None:
    """Why loopback machines can't be made here, or None."""
    if not os.path.exists(SSHD):
        return f"{SSHD} is not installed (Debian: apt-get install openssh-server)"
    if os.geteuid() != 0:
        return "needs root: sshd logs in as root, and the machines are Linux namespaces"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {missing} (Debian: apt-get install util-linux iproute2 openssh-client rsync)"
    return None


class LoopbackMachines:
    """``ips[0]`` is the head; ``bin_dir`` (a virtualenv's bin/) goes first on every machine's PATH."""

    def __init__(self, workdir: Path, ips: list[str], bin_dir: str):
        self.workdir, self.ips, self.bin_dir = Path(workdir), list(ips), bin_dir
        self.key = self.workdir / "id_ed25519"
        self._laptop: subprocess.Popen | None = None
        self._machines: dict[str, subprocess.Popen] = {}

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 20.0) -> None:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        for key in (w / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
        shutil.copy(f"{self.key}.pub", w / "authorized_keys")
        home_rc = Path("/root/.bashrc").read_text() if Path("/root/.bashrc").exists() else ""
        bashrc = home_rc + f"\nexport PATH={self.bin_dir}:$PATH\n"
        os.makedirs("/tmp/ray", exist_ok=True)  # mount point of each machine's private /tmp/ray

        self._laptop = subprocess.Popen(
            ["unshare", "--net", "--mount", "sh", "-c",
             f"ip link set lo up && {self._private('laptop', bashrc)} && exec sleep infinity"],
            stdout=open(w / "laptop.log", "w"), stderr=subprocess.STDOUT)
        self._wait_for(self._laptop_ready, timeout_s, "the laptop namespace", w / "laptop.log")
        netns = f"/proc/{self._laptop.pid}/ns/net"
        for ip in self.ips:
            config = w / f"sshd_{ip}"
            config.write_text(
                f"ListenAddress {ip}:22\nHostKey {w}/host_key\nPidFile none\nPermitRootLogin prohibit-password\n"
                f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nAuthorizedKeysFile {w}/authorized_keys\n"
                "StrictModes no\nUsePAM no\nPrintMotd no\n")
            log = w / f"sshd_{ip}.log"
            self._machines[ip] = subprocess.Popen(
                ["nsenter", f"--net={netns}", "--", "unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "sh", "-c", f"mkdir -p /run/sshd && {self._private(ip, bashrc)} && exec {SSHD} -D -e -f {config}"],
                stdout=open(log, "w"), stderr=subprocess.STDOUT)
            self._wait_for(lambda: "Server listening" in log.read_text(), timeout_s, f"sshd on {ip}", log)

    def stop(self) -> None:
        """Kill every machine (and so every process in it) and the laptop."""
        for proc in [*self._machines.values(), self._laptop]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)  # unshare --kill-child takes the namespace's init with it
                proc.wait(timeout=30)
        self._machines.clear()
        self._laptop = None

    # ---- running things -----------------------------------------------------------------------------------------

    def on_laptop(self, args: list[str], *, cwd: str, timeout_s: float, env: dict | None = None
                  ) -> subprocess.CompletedProcess:
        """Run a command on the laptop (its network and files), with ``cwd`` as working directory."""
        assert self._laptop is not None, "start() first"
        cmd = ["nsenter", f"--target={self._laptop.pid}", "--net", "--mount", f"--wd={cwd}", "--", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "TMPDIR": str(self.workdir), **(env or {})})

    def processes(self, ip: str) -> str:
        """``ps`` of one machine (for assertions and failure messages)."""
        init = self._machines[ip].pid
        out = subprocess.run(["pgrep", "-P", str(init)], capture_output=True, text=True, timeout=10).stdout.split()
        if not out:
            return ""
        return subprocess.run(["nsenter", f"--target={out[0]}", "--pid", "--mount", "--", "ps", "-ww", "-eo", "pid,args"],
                              capture_output=True, text=True, timeout=10).stdout

    # ---- internals ----------------------------------------------------------------------------------------------

    def _private(self, name: str, bashrc: str) -> str:
        """Shell that gives the current mount namespace its own /tmp/ray and a copy-on-write /root."""
        upper, work = self.workdir / name / "home", self.workdir / name / "overlay-work"
        upper.mkdir(parents=True)
        work.mkdir()
        (upper / ".bashrc").write_text(bashrc)
        return (f"mount -t tmpfs tmpfs /tmp/ray && "
                f"mount -t overlay overlay -o lowerdir=/root,upperdir={upper},workdir={work} /root")

    def _laptop_ready(self) -> bool:
        """Its namespaces are set up once it has become ``sleep``."""
        try:
            return Path(f"/proc/{self._laptop.pid}/cmdline").read_bytes().startswith(b"sleep")
        except FileNotFoundError:
            return False

    def _wait_for(self, ready, timeout_s: float, what: str, log: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            procs = [self._laptop, *self._machines.values()]
            if any(p is not None and p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.1)
