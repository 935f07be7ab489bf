"""QEMU test bed: start qemu-system-x86_64's vfio-user-pci against a socket,
drive it with qtest or let SeaBIOS boot it under KVM, record it with strace.

Everything here is a real process; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import QEMU, run_vfu, wait_for_socket
from vfu_inspect.capture import read_all
from vfu_inspect.records import Message

STRACE = shutil.which("strace")
TRACE_ARGS = ["-f", "-yy", "-xx", "-s", "1100000", "-tt",
              "-e", "trace=sendmsg,recvmsg,sendto,recvfrom"]
SLOT = 4                     # the device's PCI slot under qtest ("addr":"04.0")
BAR_BASE = 0xD0000000        # where qtest programs a memory BAR
IO_BASE = 0xC000             # where qtest programs an I/O BAR
RAM = "256M"
VFU = [sys.executable, "-m", "vfu_inspect"]     # `vfu-inspect` as a command line


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


def strace_usable() -> bool:
    return STRACE is not None and subprocess.run(
        [STRACE, "-o", "/dev/null", "true"], capture_output=True).returncode == 0


def qemu_command(sock: Path, *, qtest: str | None = None, memfd: bool = True) -> list[str]:
    """KVM + SeaBIOS, or (with `qtest`, a chardev spec) the qtest accelerator.
    Without the memfd backend QEMU sends DMA_MAP without fds."""
    device = {"driver": "vfio-user-pci", "socket": {"path": str(sock), "type": "unix"},
              "id": "dev0"}
    if qtest:
        device["addr"] = f"{SLOT:02x}.0"
        machine = ["-machine", "q35", "-accel", "qtest", "-qtest", qtest,
                   "-global", "apic.vapic=off"]        # no kvmvapic.bin to load
    else:
        machine = ["-machine", "q35,accel=kvm", "-cpu", "host",
                   "-global", "kvm-apic.vapic=off"]
    memory = ["-object", f"memory-backend-memfd,id=mem,size={RAM},share=on",
              "-numa", "node,memdev=mem"] if memfd else []
    return [QEMU, *machine, "-m", RAM, *memory, "-display", "none", "-nodefaults",
            "-L", "/usr/share/seabios", "-device", json.dumps(device)]


def traced(log: Path, cmd: list[str]) -> list[str]:
    return [STRACE, *TRACE_ARGS, "-o", str(log), *cmd]


class Processes:
    """The processes of one test, each in its own process group (so that a
    signal reaches strace and its tracee) with its output in DIR/NAME.log;
    whatever is still running when the block ends is stopped, last first."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.running: list[subprocess.Popen] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.running):
            self.stop(proc)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.running.append(proc)
        return proc

    def listening(self, name: str, sock: Path, cmd: list[str]) -> subprocess.Popen:
        proc = self.start(name, cmd)
        wait_for_socket(sock, proc, timeout=30)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 15) -> int:
        """SIGTERM the group (QEMU just closes its socket), SIGKILL if it
        lingers; the exit status (-9 then, which a test checking it sees)."""
        try:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
        except ProcessLookupError:
            return proc.wait()


def settle(path: Path, proc: subprocess.Popen, quiet: float = 2.5,
           timeout: float = 60) -> None:
    """Wait until `path` (a capture or a log) stops growing for `quiet`
    seconds: SeaBIOS has finished with the device and idles."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with {proc.returncode}")
        size = path.stat().st_size if path.exists() else -1
        now = time.monotonic()
        if size != last:
            last, since = size, now
        elif size > 0 and now - since >= quiet:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{path} still growing after {timeout} s")


def messages(path: Path) -> list[Message]:
    records, damage = read_all(path)
    assert damage is None, damage
    return [r for r in records if isinstance(r, Message)]


def imported(log: Path, out: Path) -> list[Message]:
    """An strace log as a capture, through `vfu-inspect import`."""
    result = run_vfu("import", str(log), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return messages(out)


class Qtest:
    """QEMU's qtest channel. QEMU connects to us; we send one command per line
    and read its `OK [value]` answer (FAIL/ERR raise; async `IRQ` lines are skipped).

    It is TCP on localhost, not a UNIX socket, so that an strace of QEMU
    shows only the vfio-user socket as UNIX traffic."""

    def __init__(self, timeout: float = 30) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.timeout = timeout
        self.conn: socket.socket | None = None
        self.buffer = b""

    @property
    def spec(self) -> str:
        return "tcp:127.0.0.1:%d" % self.listener.getsockname()[1]

    def accept(self, qemu: subprocess.Popen) -> None:
        """Wait for QEMU to connect, or to exit first (bounded)."""
        self.listener.settimeout(0.2)
        deadline = time.monotonic() + self.timeout
        while self.conn is None:
            try:
                self.conn, _ = self.listener.accept()
            except socket.timeout:
                if qemu.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU did not connect to qtest (exit {qemu.poll()})")
        self.conn.settimeout(self.timeout)

    def __enter__(self) -> Qtest:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()

    def __call__(self, line: str) -> str:
        self.conn.sendall(line.encode() + b"\n")
        while True:
            while b"\n" not in self.buffer:
                chunk = self.conn.recv(65536)
                if not chunk:
                    raise ConnectionError(f"QEMU closed qtest during {line!r}")
                self.buffer += chunk
            answer, self.buffer = self.buffer.split(b"\n", 1)
            text = answer.decode()
            if text.startswith("IRQ"):
                continue
            if text != "OK" and not text.startswith("OK "):
                raise RuntimeError(f"qtest {line!r}: {text}")
            return text[3:]

    # PCI configuration space of the device, through the 0xcf8/0xcfc ports
    def config_read(self, reg: int, size: int = 4) -> int:
        self(f"outl 0xcf8 {0x80000000 | SLOT << 11 | reg & ~3:#x}")
        return int(self(f"in{'bwl'[size // 2]} {0xcfc + (reg & 3):#x}"), 16)

    def config_write(self, reg: int, value: int, size: int = 4) -> None:
        self(f"outl 0xcf8 {0x80000000 | SLOT << 11 | reg & ~3:#x}")
        self(f"out{'bwl'[size // 2]} {0xcfc + (reg & 3):#x} {value:#x}")

    def bar_size(self, bar: int) -> int:
        """The BAR sizing probe: write all ones, read the mask back."""
        reg = 0x10 + 4 * bar
        self.config_write(reg, 0xFFFFFFFF)
        mask = self.config_read(reg)
        flag_bits = 0x3 if mask & 1 else 0xF      # I/O or memory BAR
        return (~(mask & ~flag_bits) & 0xFFFFFFFF) + 1

    def map_bar(self, bar: int, base: int, command: int) -> None:
        """Program the BAR and enable decoding (command: 1 I/O, 2 memory, 4 bus master)."""
        self.config_write(0x10 + 4 * bar, base)
        self.config_write(0x04, command, size=2)

    def read(self, addr: int, size: int) -> bytes:
        """Guest memory (or MMIO) as the CPU sees it."""
        return bytes.fromhex(self(f"read {addr:#x} {size:#x}")[2:])

    def write(self, addr: int, data: bytes) -> None:
        self(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")
