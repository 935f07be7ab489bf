"""A raw peer for proxy tests: echoes every chunk back with the fds it came with.

It knows nothing of vfio-user, so it shows that the proxy relays bytes it
cannot decode unchanged.  --close-on N closes each connection when its Nth
chunk arrives, without echoing that one; --as-reply turns each echoed chunk
into a vfio-user reply (type bits of a header at its start set to 1);
--reject answers each chunk, in place of the echo, with an EINVAL error reply
to the header it starts with, as libvfio-user rejects a header whose msg_size
it refuses without reading the body.
"""

import argparse
import errno
import os
import socket
import struct
import threading

from vfu_inspect.sockio import recv_chunk, send_all


def serve(conn: socket.socket, close_on: int | None, as_reply: bool, reject: bool) -> None:
    chunks = 0
    with conn:
        while True:
            data, fds = recv_chunk(conn)
            chunks += 1
            if not data or chunks == close_on:
                return
            if reject:
                msg_id, cmd = struct.unpack_from("<HH", data)
                data = struct.pack("<HHIII", msg_id, cmd, 16, 0x21, errno.EINVAL)
            elif as_reply and len(data) >= 16:
                data = data[:8] + (1).to_bytes(4, "little") + data[12:]
            send_all(conn, data, [] if reject else fds)
            for fd in fds:
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--close-on", type=int)
    parser.add_argument("--as-reply", action="store_true")
    parser.add_argument("--reject", action="store_true")
    args = parser.parse_args()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.path)
    listener.listen(8)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, args.close_on, args.as_reply, args.reject),
                         daemon=True).start()


if __name__ == "__main__":
    main()
