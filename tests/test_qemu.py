"""QEMU 10.2.2's vfio-user-pci through the proxy, against the sample server and
libvfio-user's samples: qtest-driven sessions, SeaBIOS boots under KVM, and
messaged DMA. Skipped unless VFU_INSPECT_QEMU names a qemu-system-x86_64."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import LIBVFIO_USER, needs_libvfio_user, needs_qemu, run_vfu, streams
from qemu import (BAR_BASE, IO_BASE, VFU, Processes, Qtest, imported, kvm_usable, messages,
                  qemu_command, settle, strace_usable, traced)
from vfu_inspect.dissectors.vfio_user import CMD, parse_header
from vfu_inspect.endpoints.common import (BAR0_SIZE, BAR2_SIZE, DEFAULT_ID_VALUE, DEVICE_ID,
                                          DMA_FROM_DEVICE, DMA_TO_DEVICE, REG_DMA_ADDR,
                                          REG_DMA_CMD, REG_DMA_LEN, REG_ID, REG_SCRATCH,
                                          VENDOR_ID)
from vfu_inspect.records import C2S, S2C

pytestmark = needs_qemu
needs_strace = pytest.mark.skipif(not strace_usable(), reason="strace missing or ptrace refused")

PATTERN = bytes(range(1, 33))
GUEST_SRC, GUEST_DST = 0x200000, 0x300000     # guest RAM used for DMA
BAR2_BASE = BAR_BASE + BAR2_SIZE               # the sample device's BAR2 (size-aligned)
GPIO = (0x0DC8 << 16) | 0x494F                 # gpio-pci-idio-16's device/vendor id


def lvu(sample: str) -> str:
    return str(Path(LIBVFIO_USER) / "samples" / sample)


def commands(msgs, direction: int = C2S) -> list:
    return [(parse_header(m.data), m) for m in msgs if m.direction == direction]


def region_accesses(msgs, cmd: str, region: int) -> list:
    """(header, offset, count, data) of the client's REGION_READ/WRITEs of a region."""
    out = []
    for h, m in commands(msgs):
        if h.cmd == CMD[cmd] and int.from_bytes(m.data[24:28], "little") == region:
            out.append((h, int.from_bytes(m.data[16:24], "little"),
                        int.from_bytes(m.data[28:32], "little"), m.data[32:]))
    return out


# --- 1. qtest: QEMU <-> proxy <-> server, each side's own record == the capture ---

def exercise_sample_device(qt: Qtest) -> None:
    """Config reads, BAR sizing, MMIO reads and writes, DMA both ways through
    the mapped guest RAM, and guest memory reads that show it."""
    assert qt.config_read(0x00) == DEVICE_ID << 16 | VENDOR_ID
    assert qt.bar_size(0) == BAR0_SIZE and qt.bar_size(2) == BAR2_SIZE
    qt.config_write(0x18, BAR2_BASE)
    qt.map_bar(0, BAR_BASE, command=0x6)          # memory decoding, bus master
    assert int(qt(f"readq {BAR_BASE + REG_ID:#x}"), 16) == DEFAULT_ID_VALUE
    qt(f"writeq {BAR_BASE + REG_SCRATCH:#x} 0x1122334455667788")
    assert int(qt(f"readq {BAR_BASE + REG_SCRATCH:#x}"), 16) == 0x1122334455667788
    qt.write(GUEST_SRC, PATTERN)
    dma(qt, GUEST_SRC, DMA_TO_DEVICE)
    assert qt.read(BAR2_BASE, len(PATTERN)) == PATTERN       # BAR2's mmap'd first area
    dma(qt, GUEST_DST, DMA_FROM_DEVICE)
    qt(f"readq {BAR_BASE + REG_ID:#x}")     # a read is answered after a posted write's work
    assert qt.read(GUEST_DST, len(PATTERN)) == PATTERN
    assert int(qt(f"readl {BAR2_BASE + 0x1000:#x}"), 16) == 0   # not mmap'd: REGION_READ


def dma(qt: Qtest, addr: int, command: int) -> None:
    qt(f"writeq {BAR_BASE + REG_DMA_ADDR:#x} {addr:#x}")
    qt(f"writeq {BAR_BASE + REG_DMA_LEN:#x} {len(PATTERN):#x}")
    qt(f"writeq {BAR_BASE + REG_DMA_CMD:#x} {command}")


def exercise_gpio(qt: Qtest) -> None:
    """gpio-pci-idio-16: BAR2 is 256 bytes of I/O ports; an input bit reads 1
    while its output pin's write count is a multiple of 3."""
    assert qt.config_read(0x00) == GPIO
    assert qt.bar_size(2) == 0x100
    qt.map_bar(2, IO_BASE, command=0x1)           # I/O decoding
    assert int(qt(f"inb {IO_BASE + 1:#x}"), 16) == 0xFF
    qt(f"outb {IO_BASE:#x} 0x0f")
    assert int(qt(f"inb {IO_BASE + 1:#x}"), 16) == 0xF0
    qt.write(GUEST_SRC, PATTERN)
    assert qt.read(GUEST_SRC, len(PATTERN)) == PATTERN


def start_server(procs: Processes, tmp: Path, server: str, sock: Path) -> None:
    """The sample server records what it sends; gpio-pci-idio-16 is straced."""
    if server.startswith("sample"):
        cmd = [*VFU, "sample-server", "--listen", str(sock), "--record", str(tmp / "s.vfucap"),
               *(["--no-mmap"] if server == "sample-no-mmap" else [])]
    else:
        cmd = traced(tmp / "server.strace", [lvu("gpio-pci-idio-16"), str(sock)])
    procs.listening("server", sock, cmd)


def sent_by_server(tmp: Path, server: str) -> list:
    msgs = (messages(tmp / "s.vfucap") if server.startswith("sample") else
            imported(tmp / "server.strace", tmp / "server.vfucap"))
    return [m for m in msgs if m.direction == S2C]


@needs_strace
@pytest.mark.parametrize("server", ["sample", "sample-no-mmap",
                                    pytest.param("gpio", marks=needs_libvfio_user)])
def test_qtest_session_through_the_proxy_is_what_each_side_sent(tmp_path, server):
    sock, listen, capture = tmp_path / "s.sock", tmp_path / "p.sock", tmp_path / "p.vfucap"
    with Processes(tmp_path) as procs, Qtest() as qt:
        start_server(procs, tmp_path, server, sock)
        proxy = procs.listening("proxy", listen, [*VFU, "proxy", "--listen", str(listen),
                                                  "--server", str(sock), "-w", str(capture)])
        qemu = procs.start("qemu", traced(tmp_path / "qemu.strace",
                                          qemu_command(listen, qtest=qt.spec)))
        qt.accept(qemu)
        (exercise_gpio if server == "gpio" else exercise_sample_device)(qt)
        procs.stop(qemu)
        assert procs.stop(proxy) == 0, procs.log("proxy")
    captured = messages(capture)
    sent_by_qemu = [m for m in imported(tmp_path / "qemu.strace", tmp_path / "qemu.vfucap")
                    if m.direction == C2S]
    # Per direction, message bytes and fd kinds in order: what QEMU and the
    # server each wrote is what the proxy captured and passed on.
    assert streams(captured) == streams(sent_by_qemu + sent_by_server(tmp_path, server))
    fd_kinds = {(m.direction, fd["kind"]) for m in captured for fd in m.fds}
    assert fd_kinds == {(C2S, "memfd"), (C2S, "eventfd")} | (
        {(S2C, "memfd")} if server == "sample" else set())    # BAR2's mmap fd
    region = 2 if server == "gpio" else 0
    assert region_accesses(captured, "REGION_READ", region)
    writes = region_accesses(captured, "REGION_WRITE", region)
    # QEMU posts BAR writes (NO_REPLY) only to memory BARs of a device without
    # mmap-able regions: the sample device's BAR2 is mmap-able unless --no-mmap,
    # gpio's BAR2 is I/O.
    posted = [h.no_reply for h, *_ in writes]
    assert posted and set(posted) == {server == "sample-no-mmap"}
    result = run_vfu("check", str(capture), "--fail-on", "warning")   # not even a warning
    assert result.returncode == 0, result.stdout[-3000:]


# --- 2. KVM: SeaBIOS boots through the proxy ---------------------------------

needs_kvm = pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm is not usable")
LVU_DMA_LOG = re.compile(r"mapped DMA region iova=\[(\S+), (\S+)\)"
                         r"|closing unexpected fd \d+ \(index (\d+)\) from cmd (\d+)")


def boot(procs: Processes, name: str, sock: Path, watch: Path) -> subprocess.Popen:
    """SeaBIOS enumerates the device on `sock`; returns once `watch` (a capture
    or a log) has settled, with QEMU still running."""
    qemu = procs.start(name, qemu_command(sock))
    settle(watch, qemu)
    assert qemu.poll() is None, procs.log(name)
    return qemu


def boot_through(procs: Processes, tmp: Path, name: str, server_sock: Path,
                 proxy: bool, watch: Path) -> Path | None:
    """Boot QEMU against the server, or through `proxy -w NAME-boot.vfucap`."""
    if not proxy:
        boot(procs, f"{name}-qemu", server_sock, watch)
        return None
    listen, capture = tmp / f"{name}-p.sock", tmp / f"{name}-boot.vfucap"
    procs.listening(f"{name}-proxy", listen, [*VFU, "proxy", "--listen", str(listen),
                                              "--server", str(server_sock), "-w", str(capture)])
    boot(procs, f"{name}-qemu", listen, capture)
    return capture


def quiet_qemu(log: str) -> bool:
    """QEMU said nothing but that it was stopped (no realize or vfio-user error)."""
    return all("terminating on signal" in line for line in log.splitlines())


def dma_maps(msgs) -> list[tuple[int, int, list[str]]]:
    """(iova, size, fd kinds) of each DMA_MAP the client sent."""
    return [(int.from_bytes(m.data[32:40], "little"), int.from_bytes(m.data[40:48], "little"),
             [fd["kind"] for fd in m.fds])
            for h, m in commands(msgs) if h.cmd == CMD["DMA_MAP"]]


def check_boot_capture(capture: Path) -> list:
    msgs = messages(capture)
    unmaps = [m for h, m in commands(msgs) if h.cmd == CMD["DMA_UNMAP"]]
    assert unmaps and not any(m.fds for m in unmaps)
    result = run_vfu("check", str(capture), "--fail-on", "warning")   # not even a warning
    assert result.returncode == 0, result.stdout[-3000:]
    return msgs


def sample_boot(tmp: Path, name: str, proxy: bool) -> tuple[list, Path | None]:
    """What a fresh sample server recorded of a boot, and the proxy's capture."""
    sock, record = tmp / f"{name}.sock", tmp / f"{name}-server.vfucap"
    with Processes(tmp) as procs:
        procs.listening(f"{name}-server", sock, [*VFU, "sample-server", "--listen", str(sock),
                                                 "--record", str(record)])
        capture = boot_through(procs, tmp, name, sock, proxy, record)
    assert quiet_qemu(procs.log(f"{name}-qemu"))
    return messages(record), capture


@needs_kvm
def test_seabios_boot_through_the_proxy_against_the_sample_server(tmp_path):
    direct, _ = sample_boot(tmp_path, "direct", proxy=False)
    proxied, capture = sample_boot(tmp_path, "proxied", proxy=True)
    # The server was given the same DMA regions, with the same fds, either way.
    assert dma_maps(proxied) == dma_maps(direct)
    assert sum(1 for *_, kinds in dma_maps(direct) if kinds == ["memfd"]) >= 4
    recorded = check_boot_capture(capture)
    assert streams(recorded) == streams(proxied)
    # A fresh server answers the recorded boot exactly as the first one did.
    with Processes(tmp_path) as procs:
        sock = tmp_path / "fresh.sock"
        procs.listening("fresh", sock, [*VFU, "sample-server", "--listen", str(sock)])
        replay = run_vfu("replay", str(capture), "--server", str(sock), timeout=120)
    assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr[-2000:]
    served_client_commands = serve_to_new_qemu(tmp_path, capture)
    assert served_client_commands == [h.cmd for h, _ in commands(recorded)]


def serve_to_new_qemu(tmp: Path, recording: Path) -> list[int]:
    """`serve` the recording to a new QEMU (through a proxy, to see the session
    settle); QEMU must realize the device and boot, every request answered
    from the recording. Returns the commands QEMU sent."""
    sock, listen, capture = tmp / "serve.sock", tmp / "sp.sock", tmp / "served.vfucap"
    with Processes(tmp) as procs:
        serve = procs.listening("serve", sock, [*VFU, "serve", str(recording), "--listen",
                                                str(sock), "--clients", "1"])
        procs.listening("serve-proxy", listen, [*VFU, "proxy", "--listen", str(listen),
                                                "--server", str(sock), "-w", str(capture)])
        procs.stop(boot(procs, "serve-qemu", listen, capture))   # serve reports, exits
        assert serve.wait(timeout=30) == 0, procs.log("serve")
    assert "0 without a recorded answer" in procs.log("serve"), procs.log("serve")
    assert quiet_qemu(procs.log("serve-qemu"))
    return [h.cmd for h, _ in commands(messages(capture))]


def gpio_boot(tmp: Path, name: str, proxy: bool) -> tuple[list, Path | None]:
    """libvfio-user's -v log lines about the DMA regions it mapped and the fds
    it closed as unexpected, addresses of its own mappings left out."""
    sock = tmp / f"{name}.sock"
    with Processes(tmp) as procs:
        procs.listening(f"{name}-gpio", sock, [lvu("gpio-pci-idio-16"), "-v", str(sock)])
        capture = boot_through(procs, tmp, name, sock, proxy, tmp / f"{name}-gpio.log")
    assert quiet_qemu(procs.log(f"{name}-qemu"))
    return LVU_DMA_LOG.findall(procs.log(f"{name}-gpio")), capture


@needs_kvm
@needs_libvfio_user
def test_seabios_boot_through_the_proxy_against_libvfio_user(tmp_path):
    direct, _ = gpio_boot(tmp_path, "direct", proxy=False)
    proxied, capture = gpio_boot(tmp_path, "proxied", proxy=True)
    assert proxied == direct
    assert sum(1 for iova, *_ in direct if iova) >= 4        # "mapped DMA region" lines
    check_boot_capture(capture)


# --- 3. messaged DMA: no memfd backend, DMA_MAP without fds --------------------

CHECK_ITEM = re.compile(r"^\s*\d+ (error|warning|note|chat)\s+(\S+)", re.M)
# Where QEMU and the spec disagree on messaged DMA; the sample device answers
# the BAR write before it DMAs, so nothing else (no deadlock, no timeout).
MESSAGED_DMA_ITEMS = {
    "interop.dma_qemu_layout",       # QEMU's DMA_READ reply: u32 count, data at 12
    "interop.dma_write_bare_reply",  # QEMU's DMA_WRITE reply: the bare header
}


def eventually(value, expected, timeout: float = 10):
    """Poll `value()` until it gives `expected`, or time runs out; the last value."""
    deadline = time.monotonic() + timeout
    while (got := value()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def messaged_dma(procs: Processes, name: str, listen: Path, command: int) -> None:
    """One QEMU without a memfd backend, one DMA of the sample device."""
    with Qtest() as qt:
        qemu = procs.start(name, qemu_command(listen, qtest=qt.spec, memfd=False))
        qt.accept(qemu)
        qt.config_write(0x18, BAR2_BASE)
        qt.map_bar(0, BAR_BASE, command=0x6)
        if command == DMA_TO_DEVICE:
            qt.write(GUEST_SRC, PATTERN)
            dma(qt, GUEST_SRC, command)
            # The server took the data from offset 16 of QEMU's reply, whose data is at 12.
            expected, memory = PATTERN[4:] + bytes(4), BAR2_BASE   # BAR2's mmap'd area
        else:
            qt.write(BAR2_BASE, PATTERN)
            dma(qt, GUEST_DST, command)
            # QEMU copied from offset 12 of the request, whose data is at 16.
            expected, memory = bytes(4) + PATTERN[:-4], GUEST_DST
        assert eventually(lambda: qt.read(memory, len(PATTERN)), expected) == expected
    procs.stop(qemu)
    assert "timed out" not in procs.log(name) and "unexpected" not in procs.log(name), \
        procs.log(name)


def test_messaged_dma_with_qemu_shows_the_interop_disagreements(tmp_path):
    sock, listen, capture = tmp_path / "s.sock", tmp_path / "p.sock", tmp_path / "p.vfucap"
    with Processes(tmp_path) as procs:
        procs.listening("server", sock, [*VFU, "sample-server", "--listen", str(sock)])
        proxy = procs.listening("proxy", listen, [*VFU, "proxy", "--listen", str(listen),
                                                  "--server", str(sock), "-w", str(capture)])
        for name, command in (("to-device", DMA_TO_DEVICE), ("from-device", DMA_FROM_DEVICE)):
            messaged_dma(procs, name, listen, command)
        assert procs.stop(proxy) == 0
    msgs = messages(capture)
    assert [m for h, m in commands(msgs) if h.cmd == CMD["DMA_MAP"] and m.fds] == []
    dma_cmds = [h.cmd for h, _ in commands(msgs, S2C) if not h.is_reply]
    assert dma_cmds == [CMD["DMA_READ"], CMD["DMA_WRITE"]]
    result = run_vfu("check", str(capture))
    items = set(CHECK_ITEM.findall(result.stdout))
    assert {i for severity, i in items if severity in ("error", "warning")} == \
        MESSAGED_DMA_ITEMS, result.stdout
    assert {i for severity, i in items if severity not in ("error", "warning")} <= \
        {"argsz.truncated"}
    assert result.returncode == 1        # interop.dma_write_bare_reply is an error
