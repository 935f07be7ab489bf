"""Session state: what each connection has negotiated and built, as of any message.

The tracker sees every dissected message in capture order.  It pairs replies
with requests, raises the expert items that need history (overlapping DMA
maps, accesses outside a region, forbidden migration transitions, deadlock
risks …), and keeps each connection's state as its receiver sees it.  The
receiver processes requests in stream order while the sender pipelines them
(QEMU has up to 9 DMA_UNMAP/DMA_MAP in flight), so a request's effect (a map,
an unmap, an IRQ assignment, a device state) is applied when the request is
seen, provisionally, and undone if its reply is an error; what only a reply
tells (capabilities, regions, IRQ counts) is applied with the reply.  It keeps
a copy of every connection's state each `checkpoint_every` messages, so that
"the state as of message N" costs at most that many messages of replay, even
at the end of a huge capture.

What each command checks and changes is its family's (dissectors/vfio_user/,
one module per command family, gathered in `vfio_user.SESSION`), and the
state they change is vfio_user/state.py's ConnState; this module runs them:
the checks every message gets, pairing, effects ahead of replies and their
retraction, the in-flight bound, checkpoints.
"""

from __future__ import annotations

import bisect
import copy
import struct
from dataclasses import dataclass
from typing import Any

from .dissectors import vfio_user as proto
from .dissectors.vfio_user.state import ConnState, Effect, Pending
from .packet import Dissected
from .records import C2S, MAIN, S2C, TWIN, Message
from .tree import Tree

DEFAULT_TIMEOUT = 5.0                # QEMU's x-msg-timeout
# Requests a connection may have in flight before the oldest are forgotten:
# a peer that never answers must not grow memory without bound.
MAX_INFLIGHT = 1 << 16
REQUEST_KEPT = 64


def _send(state: ConnState, p: Pending) -> None:
    """Put a request in flight; past MAX_INFLIGHT the oldest is forgotten."""
    if len(state.inflight) >= MAX_INFLIGHT:
        oldest = next(iter(state.inflight.values()))
        state.answer(oldest.channel, 1 - oldest.direction, oldest.msg_id)
        if oldest.effect is not None:
            state.settle(oldest.effect)
    state.inflight[p.number] = p
    state.by_key.setdefault((p.channel, p.direction, p.msg_id), []).append(p.number)


def _push(state: ConnState, effect: Effect) -> None:
    """Keep an applied effect until its reply; a request never answered
    must not keep every later one (and memory) waiting."""
    state.effects.append(effect)
    if len(state.effects) > MAX_INFLIGHT:
        state.settle(state.effects[0])


@dataclass
class Snapshot:
    number: int                        # the state after this message
    connections: dict[int, ConnState]
    ts_ns: int | None = None


class SessionTracker:
    """Follows every connection of a capture; see the module docstring."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, checkpoint_every: int = 4096) -> None:
        self.timeout_ns = int(timeout * 1e9)
        self.checkpoint_every = checkpoint_every
        self.conns: dict[int, ConnState] = {}
        self.checkpoints: list[tuple[int, dict[int, ConnState]]] = []
        # Connections whose state a checkpoint holds too: copied before their
        # first change, so a checkpoint costs only what changes after it.
        self._shared: set[int] = set()

    def connection(self, conn: int) -> ConnState:
        """The state of `conn`, ready to be changed."""
        state = self.conns.get(conn)
        if state is None:
            state = self.conns[conn] = ConnState(conn, proto.SESSION)
        elif conn in self._shared:
            state = self.conns[conn] = copy.deepcopy(state)
            self._shared.discard(conn)
        return state

    def close(self, conn: int) -> None:
        self.connection(conn).closed = True

    def qemu_dma(self, conn: int) -> str | None:
        """Why `conn`'s client is known to use QEMU's DMA layout (see Context)."""
        state = self.conns.get(conn)
        return state.qemu_dma if state is not None else None

    def pair(self, number: int, msg: Message, header: proto.HeaderInfo | None) -> Pending | None:
        """Before dissection: the request a reply answers (None for a command)."""
        if header is None or not header.is_reply:
            return None
        return self.connection(msg.conn).answer(msg.channel, msg.direction, header.msg_id)

    def feed(self, p: Dissected, request: Pending | None) -> None:
        """After dissection: check `p` against the state, then apply it."""
        state = self.connection(p.msg.conn)
        h = p.header
        if h is not None:
            _check_message(state, p, self.timeout_ns)
            if h.is_reply:
                _on_reply(state, p, request)
            else:
                _on_command(state, p)
        if self.checkpoint_every and p.number % self.checkpoint_every == 0:
            self.checkpoints.append((p.number, dict(self.conns)))
            self._shared = set(self.conns)

    def restored(self, conns: dict[int, ConnState]) -> SessionTracker:
        """A tracker without checkpoints that goes on from `conns` (left untouched)."""
        tracker = SessionTracker(self.timeout_ns / 1e9, checkpoint_every=0)
        tracker.conns, tracker._shared = dict(conns), set(conns)
        return tracker

    def nearest_checkpoint(self, number: int) -> tuple[int, SessionTracker]:
        """The last checkpoint at or before message `number`: its message
        number and a tracker that goes on from it."""
        i = bisect.bisect_right(self.checkpoints, number, key=lambda c: c[0])
        start, conns = self.checkpoints[i - 1] if i else (0, {})
        return start, self.restored(conns)


# --- checks on every message -------------------------------------------------------

def _check_message(state: ConnState, p: Dissected, timeout_ns: int) -> None:
    msg, tree, h = p.msg, p.tree, p.header
    caps = state.receiver_caps(msg.direction)
    if caps is not None:
        limit = state.cap(caps, "max_msg_fds")
        if len(msg.fds) > limit:
            tree.expert("fd.over_max", f"{len(msg.fds)} fds, the receiver's max_msg_fds is {limit}")
    if msg.channel == TWIN and not state.twin:
        tree.expert("twin.not_negotiated", "message on a twin socket that VERSION did not set up")
    elif state.twin and not h.is_reply and (msg.channel == TWIN) != (msg.direction == S2C):
        tree.expert("twin.wrong_channel", f"{h.command_name} from the "
                    f"{'server' if msg.direction == S2C else 'client'} on the "
                    f"{'twin' if msg.channel == TWIN else 'main'} socket: with twin-socket mode "
                    "server commands go on the twin socket, client commands on the main one")
    for pending in state.inflight.values():
        if pending.timed_out or msg.ts_ns - pending.ts_ns <= timeout_ns:
            break        # oldest first: the rest are younger
        pending.timed_out = True
        tree.expert("request.timeout",
                    f"frame {pending.number} ({proto.COMMANDS.get(pending.cmd, pending.cmd)}) "
                    f"unanswered for {(msg.ts_ns - pending.ts_ns) / 1e9:.1f} s")
    if (not h.is_reply and msg.direction == S2C and msg.channel == MAIN and not state.twin
            and any(q.direction == C2S for q in state.inflight.values())):
        waiting = next(q for q in state.inflight.values() if q.direction == C2S)
        tree.expert("deadlock.server_command",
                    f"{h.command_name} sent while the client waits for frame {waiting.number} "
                    f"({proto.COMMANDS.get(waiting.cmd, waiting.cmd)}) and no twin socket: "
                    f"a single-threaded client deadlocks")


# --- commands -------------------------------------------------------------------------
# A command gets the checks every request gets, then its family's check, whose
# findings say whether its effect applies ahead of the reply.

def _on_command(state: ConnState, p: Dissected) -> None:
    h, msg = p.header, p.msg
    if h.cmd == proto.CMD["VERSION"]:
        state.version_sent = True
    elif msg.direction == C2S and not state.version_sent:
        p.tree.expert("version.not_first", f"{h.command_name} before VERSION")
    key = (msg.channel, msg.direction, h.msg_id)
    if h.no_reply:
        state.posted[key] = p.number
    elif key in state.by_key:
        p.tree.expert("request.duplicate_id",
                      f"msg_id {h.msg_id:#06x} is also in flight in frame "
                      f"{state.by_key[key][0]}; replies are matched in order")
    check = proto.SESSION.command_checks.get(h.cmd)
    values = check(state, p) if check else None
    refused = [e for e in p.tree.experts if e.id in proto.SESSION.must_refuse]
    # What the receiver must refuse changes nothing, unless its reply says it did.
    effect = None if refused else _apply_effect(state, p.number, h.cmd, values, msg.fds)
    if not h.no_reply:
        pending = Pending(p.number, h.cmd, h.msg_id, msg.direction, msg.channel, msg.ts_ns,
                          msg.data[:REQUEST_KEPT], msg.fds, values or {}, refused)
        _send(state, pending)
        if effect is not None:
            pending.effect = effect
            _push(state, effect)


def _apply_effect(state: ConnState, number: int, cmd: int, values: dict[str, Any] | None,
                  fds: list[dict[str, Any]]) -> Effect | None:
    kind = proto.SESSION.effects.get(cmd)
    if values is None or kind is None:
        return None
    effect = Effect(number, cmd, values, fds, kind)
    state.apply(effect)
    return effect


# --- replies ----------------------------------------------------------------------------

def _on_reply(state: ConnState, p: Dissected, request: Pending | None) -> None:
    h, msg, tree = p.header, p.msg, p.tree
    if request is None:
        posted = state.posted.pop((msg.channel, 1 - msg.direction, h.msg_id), None)
        if posted is not None:
            tree.expert("reply.to_no_reply", f"answers frame {posted}, sent with NO_REPLY: "
                        "a client that posted it (QEMU) takes this for the next reply")
        else:
            tree.expert("reply.unmatched", f"no request with msg_id {h.msg_id:#06x} is in flight")
        return
    if request.cmd != h.cmd:
        tree.expert("reply.command_mismatch", f"reply says {h.command_name}, its request "
                    f"(frame {request.number}) was {proto.COMMANDS.get(request.cmd, request.cmd)}")
        if request.effect is not None:
            state.settle(request.effect)
        return
    if h.is_error:
        _refusal_errno(tree, request, h.error)
        if request.effect is not None and not request.effect.answered:
            _retract(state, tree, request)
        return
    _reply_fits(p, request)
    if request.effect is not None:
        state.settle(request.effect)
    for e in request.must_refuse:
        tree.expert("reply.accepted_invalid", f"frame {request.number} should have failed: "
                    f"{e.message} ({e.id})")
    if request.must_refuse:         # it did change the receiver's state
        _apply_effect(state, request.number, h.cmd, request.values, request.fds)
    apply = proto.SESSION.reply_applies.get(h.cmd)
    if apply:
        apply(state, p, request)


def _refusal_errno(tree: Tree, request: Pending, error: int) -> None:
    for e in request.must_refuse:
        if e.id in proto.SESSION.refusal_errno and error != proto.SESSION.refusal_errno[e.id][1]:
            expert_id, wanted = proto.SESSION.refusal_errno[e.id]
            tree.expert(expert_id, f"frame {request.number} ({e.id}) refused with "
                        f"{proto.ERRNO_NAMES.get(error, error)}; the spec says "
                        f"{proto.ERRNO_NAMES[wanted]}")


def _reply_fits(p: Dissected, request: Pending) -> None:
    """A reply's payload fits its request's argsz, and repeats what it echoes."""
    payload = p.msg.wire_size - proto.HEADER_SIZE
    if request.cmd in proto.SESSION.argsz_bounded and len(request.data) >= proto.HEADER_SIZE + 4:
        argsz = struct.unpack_from("<I", request.data, proto.HEADER_SIZE)[0]
        if payload > argsz:
            p.tree.expert("argsz.reply_exceeds", f"{payload}-byte reply payload, frame "
                          f"{request.number}'s argsz allowed {argsz}")
    echo = proto.SESSION.echoes.get(request.cmd)
    if echo is not None:
        echo(p, request)


def _retract(state: ConnState, tree: Tree, failed: Pending) -> None:
    """A request applied ahead of its reply failed: the requests pipelined
    after it were sent against a state that did not come to be."""
    for later, expert_id, message in state.retract(failed.effect):
        tree.expert(expert_id, f"frame {later.number}, pipelined after frame {failed.number} "
                    f"which failed: {message}")
        pending = state.inflight.get(later.number)
        if pending is not None:
            pending.must_refuse.append(tree.experts[-1])


