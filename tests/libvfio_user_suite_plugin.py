"""A pytest plugin for libvfio-user's own suite (test/py): its client talks
to its in-process server through `vfu-inspect proxy`.

The suite's server listens on libvfio_user.SOCK_PATH (/tmp/vfio-user.sock.PID)
and its client connects there with `libvfio_user.connect_sock`.  This plugin starts the
proxy (listening in $VFU_SUITE_DIR, relaying to that path, writing
suite.vfucap), points `connect_sock` at the proxy, and writes tests.json:
each test's node id and start time (the proxy's clock: time.time_ns), in
order, so that each captured message can be given to the test that sent it.

The suite sends a request and then runs the server once, often with a
non-blocking context that handles only what has already arrived; through
the proxy the bytes arrive a little later.  So before the server accepts,
runs or replies after quiescing, the plugin waits (at most RELAY_WAIT) for
the server's socket to have something to read: a request, or the EOF of a
client that closed its socket and expects the server's reply to fail.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

DIR = Path(os.environ.get("VFU_SUITE_DIR", "."))
LISTEN, CAPTURE, TESTS = DIR / "proxy.sock", DIR / "suite.vfucap", DIR / "tests.json"
STARTUP_SECONDS = 10.0
RELAY_WAIT = 0.2            # what a relay hop may take; a request never sent costs this much


class ProxiedSuite:
    def __init__(self, libvfio_user: Any) -> None:
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "vfu_inspect", "proxy", "--listen", str(LISTEN),
             "--server", libvfio_user.SOCK_PATH.decode(), "-w", str(CAPTURE)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_SECONDS
        while not LISTEN.exists():
            if time.monotonic() > deadline or self.proxy.poll() is not None:
                raise RuntimeError("vfu-inspect proxy did not start")
            time.sleep(0.01)
        self.tests: list[tuple[str, int]] = []
        self.lib = libvfio_user.lib
        self.lib.vfu_get_poll_fd.argtypes = (ctypes.c_void_p,)
        libvfio_user.connect_sock = self.connect
        libvfio_user.vfu_attach_ctx = self.when_readable(libvfio_user.vfu_attach_ctx)
        libvfio_user.vfu_run_ctx = self.when_readable(libvfio_user.vfu_run_ctx)
        libvfio_user.vfu_device_quiesced = self.when_readable(libvfio_user.vfu_device_quiesced)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(LISTEN))
        return sock

    def when_readable(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """`call`, once the context's socket (listening or connected) is readable."""
        def wrapper(ctx: Any, *args: Any, **kw: Any) -> Any:
            fd = self.lib.vfu_get_poll_fd(ctx) if ctx else -1
            if fd >= 0:
                select.select([fd], [], [], RELAY_WAIT)
            return call(ctx, *args, **kw)
        return wrapper

    def close(self) -> None:
        self.proxy.terminate()
        self.proxy.wait(timeout=10)
        TESTS.write_text(json.dumps(self.tests))


_suite: ProxiedSuite | None = None


def pytest_configure(config: Any) -> None:
    global _suite
    sys.path.insert(0, str(config.rootpath))
    import libvfio_user         # patched before the suite's modules star-import it
    _suite = ProxiedSuite(libvfio_user)


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    if _suite is not None:
        _suite.tests.append((nodeid, time.time_ns()))


def pytest_unconfigure(config: Any) -> None:
    if _suite is not None:
        _suite.close()
