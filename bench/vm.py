"""Throwaway Debian VMs under qemu (TCG) for measurements that need a real kernel.

The disk images come from ``images/build-vm`` (cached under ``/var/tmp/selfhost-vm/<release>``).
:func:`boot` starts one VM from a copy-on-write qcow2 overlay of the cached raw image, so every
run starts from the untouched system and the cache is never written; at the end the VM is
stopped and the overlay deleted::

    with boot("bookworm") as vm:
        print(vm.sh("uname -r").stdout)        # runs as root (over SSH, as root or via sudo)
        vm.login("alice", key)                 # after a deploy that turns root login off

SSH is published with user-mode networking on 127.0.0.1 only (``hostfwd``). Commands reuse
one SSH connection (ControlMaster), so many short commands do not trip the server's own SSH
rate limit. ``/dev/kvm`` is deliberately not used: nested KVM guests hang in this sandbox.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VM_DIR = Path(os.environ.get("SELFHOST_VM_DIR", "/var/tmp/selfhost-vm"))
KEY = VM_DIR / "id_ed25519"
"""Root's key baked into the images by ``images/build-vm``."""


def build(*releases: str) -> None:
    """Build (or confirm up to date) the cached images with ``images/build-vm``."""
    p = subprocess.run([str(ROOT / "images" / "build-vm"), *releases], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"images/build-vm failed ({p.returncode}):\n"
                           f"{(p.stdout + p.stderr)[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VM:
    release: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    user: str = "root"
    key: Path = KEY
    boot_s: float | None = None
    """Seconds from starting qemu until SSH answered."""
    _masters: list[str] = field(default_factory=list)

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    def ssh_opts(self, user: str | None = None, key: Path | None = None,
                 master: bool = True) -> list[str]:
        user = user or self.user
        opts = ["-i", str(key or self.key), "-p", str(self.port),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=8", "-o", "LogLevel=ERROR"]
        if master:
            opts += ["-o", "ControlMaster=auto", "-o",
                     f"ControlPath={self.workdir}/cm-{user}", "-o", "ControlPersist=900"]
        return opts

    def ssh(self, command: str, user: str | None = None, timeout: float = 600,
            input: bytes | None = None, master: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run ``command`` as the login user (no sudo)."""
        user = user or self.user
        if master and user not in self._masters:
            self._masters.append(user)
        return subprocess.run(["ssh", *self.ssh_opts(user, master=master), f"{user}@127.0.0.1",
                               command], input=input, capture_output=True, timeout=timeout)

    def as_root(self, script: str) -> str:
        """The remote command line that runs ``script`` as root for the current login."""
        if self.user == "root":
            return f"sh -c {shlex.quote(script)}"
        return f"sudo -n sh -c {shlex.quote(script)}"

    def sh(self, script: str, timeout: float = 600,
           input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run a shell script as root (directly, or through sudo after :meth:`login`)."""
        p = self.ssh(self.as_root(script), timeout=timeout, input=input)
        return subprocess.CompletedProcess(p.args, p.returncode,
                                           p.stdout.decode(errors="replace"),
                                           p.stderr.decode(errors="replace"))

    def put_dir(self, local: Path, remote: str, timeout: float = 600) -> None:
        """Copy the contents of ``local`` into ``remote`` (created, owned by root)."""
        tar = subprocess.run(["tar", "-C", str(local), "-ch", "."], capture_output=True,
                             check=True).stdout
        p = self.sh(f"mkdir -p {shlex.quote(remote)} && tar -x --no-same-owner "
                    f"-C {shlex.quote(remote)}", timeout=timeout, input=tar)
        if p.returncode != 0:
            raise RuntimeError(f"copy to {remote} failed: {p.stderr.strip()}")

    def get_file(self, remote: str, local: Path, timeout: float = 600) -> None:
        p = self.ssh(self.as_root(f"cat {shlex.quote(remote)}"), timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"copy of {remote} failed: {p.stderr.decode().strip()}")
        local.write_bytes(p.stdout)

    def login(self, user: str, key: Path | None = None) -> None:
        """Use ``user`` (with sudo) for later commands, e.g. once root login is off."""
        self.close_masters()
        self.user = user
        if key:
            self.key = key

    def close_masters(self) -> None:
        for user in self._masters:
            subprocess.run(["ssh", "-o", f"ControlPath={self.workdir}/cm-{user}", "-O", "exit",
                            "-p", str(self.port), f"{user}@127.0.0.1"], capture_output=True,
                           timeout=30)
        self._masters.clear()

    def wait_ssh(self, timeout: float = 300) -> None:
        t0 = time.monotonic()
        last = ""
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                p = self.ssh("true", master=False, timeout=30)
                if p.returncode == 0:
                    return
                last = p.stderr.decode(errors="replace").strip()
            except subprocess.TimeoutExpired:
                last = "ssh timed out"
            time.sleep(3)
        raise RuntimeError(f"no SSH on 127.0.0.1:{self.port} after {timeout:.0f} s ({last});"
                           f" serial console:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.serial_log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def vm_sh(vm: VM, script: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as root in ``vm`` (see :meth:`VM.sh`)."""
    return vm.sh(script, timeout=timeout)


@contextlib.contextmanager
def boot(release: str, memory: int = 2048, cpus: int = 2, timeout: float = 300,
         keep_log: Path | None = None) -> Iterator[VM]:
    """Boot ``release`` from a fresh overlay; yield once SSH answers; stop and clean up."""
    base = VM_DIR / release
    for f in ("disk.raw", "vmlinuz", "initrd.img"):
        if not (base / f).is_file():
            raise RuntimeError(f"{base / f} missing: run images/build-vm {release}")
    workdir = Path(tempfile.mkdtemp(prefix=f"selfhost-vm-{release}-", dir="/var/tmp"))
    overlay = workdir / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base / "disk.raw"),
                    "-F", "raw", str(overlay)], check=True, capture_output=True)
    port = free_port()
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory), "-smp", str(cpus),
           "-nographic", "-monitor", "none", "-serial", f"file:{workdir / 'serial.log'}",
           "-kernel", str(base / "vmlinuz"), "-initrd", str(base / "initrd.img"),
           "-append", "root=/dev/vda ro console=ttyS0",
           "-drive", f"file={overlay},format=qcow2,if=virtio,cache=unsafe,discard=unmap",
           "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
           "-device", "virtio-net-pci,netdev=net0",
           "-device", "virtio-rng-pci",
           "-pidfile", str(workdir / "qemu.pid")]
    t0 = time.monotonic()
    with open(workdir / "qemu.out", "wb") as qout:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qout,
                                stderr=subprocess.STDOUT)
    vm = VM(release=release, port=port, workdir=workdir, proc=proc)
    try:
        vm.wait_ssh(timeout)
        vm.boot_s = round(time.monotonic() - t0, 1)
        yield vm
    finally:
        with contextlib.suppress(Exception):
            vm.close_masters()
        if proc.poll() is None:
            proc.terminate()  # the overlay is thrown away: no need for a clean guest shutdown
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if keep_log:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(vm.serial_log, keep_log)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":  # smoke test: python bench/vm.py [release]
    import sys

    rel = sys.argv[1] if len(sys.argv) > 1 else "bookworm"
    build(rel)
    with boot(rel) as v:
        print(f"{rel}: SSH after {v.boot_s} s on 127.0.0.1:{v.port}")
        print(v.sh("uname -r; hostname; systemctl is-system-running; "
                   "systemctl --failed --no-legend; ip -br a; getent hosts deb.debian.org").stdout)
