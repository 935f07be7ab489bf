"""`vfu-inspect demo`: the sample server, the proxy and the sample client, live.

The server and the client are real processes talking through a real proxy;
the demo prints the session as it happens and leaves a capture behind.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

from .addons import PrintAddon, SaveAddon
from .proxy import Proxy

STARTUP_TIMEOUT = 10.0


def run_demo(capture: str, out: TextIO = sys.stdout, color: bool = False,
             twin: bool = True) -> int:
    with tempfile.TemporaryDirectory(prefix="vfu-demo-") as tmp:
        server_path, proxy_path = Path(tmp, "server.sock"), Path(tmp, "proxy.sock")
        vfu = [sys.executable, "-m", "vfu_inspect"]
        server = subprocess.Popen([*vfu, "sample-server", "--listen", str(server_path)])
        try:
            if not _wait_for(server_path, server):
                print("vfu-inspect: error: the sample server did not start", file=sys.stderr)
                return 2
            proxy = Proxy(str(proxy_path), str(server_path),
                          [SaveAddon(capture, "demo"), PrintAddon(out, color)])
            proxy.start()
            relay = threading.Thread(target=proxy.run)
            relay.start()
            client = subprocess.run([*vfu, "sample-client", "--server", str(proxy_path),
                                     *([] if twin else ["--no-twin"])])
            time.sleep(0.1)          # let the relay see the client's close
            proxy.stop()
            relay.join()
        finally:
            server.terminate()
            server.wait()
    verdict = "succeeded" if client.returncode == 0 else f"FAILED ({client.returncode})"
    print(f"\nThe sample client {verdict}. The session is saved in {capture}. Next:\n"
          f"  vfu-inspect read {capture} -V -Y 'vfio_user.cmd == DEVICE_GET_REGION_INFO'\n"
          f"  vfu-inspect read {capture} -Y 'fd' -T fields -e frame.number -e fd.purpose\n",
          file=out)
    return 0 if client.returncode == 0 else 1


def _wait_for(path: Path, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.02)
    return False
