"""`vfu-inspect demo`: the sample server, the proxy and the sample client, live.

The server and the client are real processes talking through a real proxy
(with --trace-irqs, so that the device's interrupts show too); the demo
prints the session as it happens and leaves a capture behind.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

from .addons import AddonContext, load_addons, parse_options
from .proxy import Proxy

STARTUP_TIMEOUT = 10.0


def run_demo(capture: str, out: TextIO = sys.stdout, color: bool = False,
             twin: bool = True, tui: bool = False) -> int:
    """Run the session; with `tui`, show it in the terminal UI (quit with q)."""
    with tempfile.TemporaryDirectory(prefix="vfu-demo-") as tmp:
        server_path, proxy_path = Path(tmp, "server.sock"), Path(tmp, "proxy.sock")
        monitor = str(Path(tmp, "monitor.sock"))
        vfu = [sys.executable, "-m", "vfu_inspect"]
        client_args = [*vfu, "sample-client", "--server", str(proxy_path),
                       *([] if twin else ["--no-twin"])]
        server = subprocess.Popen([*vfu, "sample-server", "--listen", str(server_path)])
        client: subprocess.Popen | None = None
        try:
            if not _wait_for(server_path, server):
                print("vfu-inspect: error: the sample server did not start", file=sys.stderr)
                return 2
            view = ["--monitor", monitor] if tui else \
                ["--print", "--color", "always" if color else "never"]
            addons = load_addons(parse_options(["-w", capture, *view]),
                                 AddonContext("demo", out))
            proxy = Proxy(str(proxy_path), str(server_path), addons, trace_irqs=True)
            proxy.start()
            if tui:
                from .tui import run_with_proxy

                def start_client() -> None:
                    nonlocal client
                    client = subprocess.Popen(client_args, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
                run_with_proxy(proxy, monitor, then=start_client)
                returncode = client.wait() if client else 1
            else:
                returncode = _relay_while(proxy, client_args)
        finally:
            if client is not None and client.poll() is None:
                client.terminate()
            server.terminate()
            server.wait()
    verdict = "succeeded" if returncode == 0 else f"FAILED ({returncode})"
    print(f"\nThe sample client {verdict}. The session is saved in {capture}. Next:\n"
          f"  vfu-inspect tui {capture}\n"
          f"  vfu-inspect read {capture} -V -Y 'vfio_user.cmd == DEVICE_GET_REGION_INFO'\n"
          f"  vfu-inspect check {capture}\n"
          f"  vfu-inspect read {capture} -q -z irq\n", file=out)
    return 0 if returncode == 0 else 1


def _relay_while(proxy: Proxy, client_args: list[str]) -> int:
    """Relay on a thread until the client exits; its exit status."""
    relay = threading.Thread(target=proxy.run)
    relay.start()
    returncode = subprocess.run(client_args).returncode
    time.sleep(0.1)          # let the relay see the client's close
    proxy.stop()
    relay.join()
    return returncode


def _wait_for(path: Path, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.02)
    return False
