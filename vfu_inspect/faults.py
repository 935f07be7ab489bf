"""Fault injection: `proxy --fault 'FILTER: ACTION [TRIGGER]'` (and `replay --fault`).

FILTER is the display-filter language, on the message's own fields (its
header, payload and fds, and frame.conn/channel/dir/len/fds).  ACTION:

    errno E        answer the request with an error reply in place of its receiver
    delay D        deliver it D late (250ms, 1.5s, 100us): what follows it waits too
    drop           do not deliver it
    close before   close the connection instead of delivering it
    close after    deliver it, then close the connection
    rewrite F=V    set field F: a VERSION capability (the JSON and msg_size are
                   re-encoded) or a fixed-width field (vfio_user.error, region_read.count …)
    truncate N     deliver its first N bytes, with msg_size N
    duplicate      deliver it twice

TRIGGER: every match (the default), `nth=N` (the Nth only), `every=N` (the
Nth, 2Nth …), `p=P [seed=S]` (each match with probability P).  Rules are
tried in order; the first whose filter matches, whose action applies (errno
needs a request that expects a reply, rewrite a message with that field,
truncate one longer than N) and whose trigger fires acts; that is a match.

Nothing is held or dissected unless a rule may match: each rule is first
evaluated, once per distinct header, on what the header says (see
`DisplayFilter.could_match`); only candidates wait until whole to be decided.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from .dfilter import DisplayFilter, FilterError, PartialValues, compile_filter
from .dissectors import vfio_user as proto
from .endpoints.common import error_to
from .fields import BOOL, lookup
from .framing import DEFAULT_MAX_MESSAGE
from .records import C2S, CHANNELS, DIRECTIONS
from .tree import Tree, bit_values

ACTIONS = ("errno", "delay", "drop", "close", "rewrite", "truncate", "duplicate")
MAX_DELAY = 3600.0
MAX_COUNT = 1 << 31
MAX_RULES = 1000
MAX_FILE = 1 << 20
_MEMO_LIMIT = 4096
_HEADER = proto.Header.vfu_compiled.struct
_SIZE = struct.Struct("<I")
_unpack_cmd_size_flags = struct.Struct("<2xHIQ").unpack_from   # cmd, size, flags | error << 32
_HEADER_SIZE = proto.HEADER_SIZE
_ERRNOS = {name: number for number, name in proto.ERRNO_NAMES.items()}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(us|ms|s)?")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}
# Fields a fault filter can test: what the message itself says.
_FRAME_FIELDS = {"frame", "frame.conn", "frame.channel", "frame.dir", "frame.len", "frame.fds"}
_LINKS = {"vfio_user.response_in", "vfio_user.response_to", "vfio_user.time"}
_MESSAGE_FIELDS = {fd.name for fd in proto.protocol_fields()} - _LINKS | {"vfio_user"}
_FLAGS = proto.FIELDS["vfio_user.flags"]


class FaultError(Exception):
    """A fault specification that cannot be used; the message says why."""


@dataclass
class Action:
    name: str                   # one of ACTIONS
    errno: int = 0
    delay: float = 0.0
    after: bool = False         # close: after delivering the message
    field: str = ""             # rewrite
    value: Any = None
    size: int = 0               # truncate


@dataclass
class Trigger:
    nth: int = 0
    every: int = 0
    probability: float = 1.0
    seed: int = 0
    matches: int = 0
    _random: random.Random | None = None

    def fires(self) -> bool:
        """Count one more match; whether the fault acts on it."""
        self.matches += 1
        if self.nth:
            return self.matches == self.nth
        if self.every:
            return self.matches % self.every == 0
        if self.probability < 1.0:
            if self._random is None:
                self._random = random.Random(self.seed)
            return self._random.random() < self.probability
        return True


@dataclass
class Rule:
    number: int
    text: str
    filter: DisplayFilter
    action: Action
    trigger: Trigger


@dataclass
class Fault:
    """What a rule does to one message."""

    rule: Rule
    action: Action
    data: bytes                 # what to deliver: the message, rewritten or cut
    answer: bytes | None        # errno: the error reply to the sender
    info: dict[str, Any]        # the fault record's info

    @property
    def delivered(self) -> bool:
        """Whether the receiver gets the message (or what it became)."""
        action = self.action
        return not (action.name in ("errno", "drop") or action.name == "close"
                    and not action.after)


# --- parsing ----------------------------------------------------------------------

def load_rules(specs: list[str], files: list[str] = ()) -> list[Rule]:
    """Rules from --fault texts, then from fault files (one a line, # comments)."""
    texts = list(specs)
    for path in files:
        texts += _file_rules(path)
    if len(texts) > MAX_RULES:
        raise FaultError(f"{len(texts)} fault rules: at most {MAX_RULES}")
    return [parse_rule(text, number) for number, text in enumerate(texts, 1)]


def _file_rules(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_FILE + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise FaultError(f"cannot read fault file {path}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if len(text) > MAX_FILE:
        raise FaultError(f"fault file {path} is over {MAX_FILE} bytes")
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def parse_rule(text: str, number: int = 1) -> Rule:
    """'FILTER: ACTION [TRIGGER]'; FaultError says what is wrong."""
    where = f"fault {number} ({text.strip()!r})"
    split = _action_start(text)
    if split is None:
        raise FaultError(f"{where}: expected 'FILTER: ACTION' with ACTION one of "
                         f"{', '.join(ACTIONS)}")
    filter_text = text[:split].strip()
    if not filter_text:
        raise FaultError(f"{where}: no filter before ':' (use 'vfio_user' for every message)")
    try:
        display = compile_filter(filter_text)
    except FilterError as exc:
        raise FaultError(f"{where}: invalid filter: {exc}") from None
    unusable = sorted(name for name in display.fields if not _usable(name))
    if unusable:
        raise FaultError(f"{where}: a fault filter tests the message's own fields "
                         f"(vfio_user.*, dma_map.size, fd.kind, frame.dir …), not "
                         f"{', '.join(unusable)}")
    words = text[split + 1:].split()
    triggers = [w for w in words[1:] if "=" in w and w.split("=")[0] in ("nth", "every", "p",
                                                                         "seed")]
    arguments = [w for w in words[1:] if w not in triggers]
    try:
        action = _action(words[0], arguments)
        trigger = _trigger(triggers)
    except FaultError as exc:
        raise FaultError(f"{where}: {exc}") from None
    return Rule(number, text.strip(), display, action, trigger)


def _action_start(text: str) -> int | None:
    """The ':' that ends the filter: the last one an action word follows."""
    for i in range(len(text) - 1, -1, -1):
        if text[i] == ":" and text[i + 1:].split()[:1] and text[i + 1:].split()[0] in ACTIONS:
            return i
    return None


def _usable(name: str) -> bool:
    return name in _FRAME_FIELDS or name in _MESSAGE_FIELDS or name.split(".")[0] == "fd"


def _action(name: str, args: list[str]) -> Action:
    wants = {"errno": 1, "delay": 1, "close": 1, "rewrite": 1, "truncate": 1}.get(name, 0)
    if len(args) != wants:
        usage = {"errno": "errno EIO", "delay": "delay 250ms", "close": "close before|after",
                 "rewrite": "rewrite FIELD=VALUE", "truncate": "truncate BYTES"}.get(name, name)
        raise FaultError(f"{name} takes {wants or 'no'} argument{'s' if wants != 1 else ''}: "
                         f"{usage}")
    arg = args[0] if args else ""
    if name == "errno":
        return Action(name, errno=_errno(arg))
    if name == "delay":
        return Action(name, delay=_duration(arg))
    if name == "close":
        if arg not in ("before", "after"):
            raise FaultError(f"close before|after, not {arg!r}")
        return Action(name, after=arg == "after")
    if name == "rewrite":
        return _rewrite(arg)
    if name == "truncate":
        size = _count(arg, "truncate")
        if not proto.HEADER_SIZE <= size <= DEFAULT_MAX_MESSAGE:
            raise FaultError(f"truncate keeps {proto.HEADER_SIZE} to {DEFAULT_MAX_MESSAGE} "
                             f"bytes (the header stays whole), not {size}")
        return Action(name, size=size)
    return Action(name)


def _errno(text: str) -> int:
    value = _ERRNOS.get(text.upper())
    if value is None and text.isdigit():
        value = int(text)
    if value is None or not 0 < value < 4096:
        raise FaultError(f"errno {text!r}: give a name such as EIO or a number 1-4095")
    return value


def _duration(text: str) -> float:
    m = _DURATION.fullmatch(text)
    seconds = float(m.group(1)) * _UNITS[m.group(2)] if m else -1.0
    if not 0 < seconds <= MAX_DELAY:
        raise FaultError(f"delay {text!r}: give a duration up to {MAX_DELAY:.0f} s, such as "
                         "250ms, 1.5s or 100us")
    return seconds


def _count(text: str, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise FaultError(f"{what} needs a number, not {text!r}") from None
    if not 0 < value < MAX_COUNT:
        raise FaultError(f"{what}={value}: must be 1 to {MAX_COUNT - 1}")
    return value


def _trigger(words: list[str]) -> Trigger:
    trigger = Trigger()
    for word in words:
        key, _, value = word.partition("=")
        if key == "nth":
            trigger.nth = _count(value, "nth")
        elif key == "every":
            trigger.every = _count(value, "every")
        elif key == "seed":
            trigger.seed = _count(value, "seed") if value != "0" else 0
        else:
            try:
                trigger.probability = float(value)
            except ValueError:
                trigger.probability = -1.0
            if not 0 < trigger.probability <= 1:
                raise FaultError(f"p={value}: a probability in (0, 1]")
    if sum(bool(x) for x in (trigger.nth, trigger.every, trigger.probability < 1)) > 1:
        raise FaultError("give one trigger: nth=N, every=N or p=P")
    return trigger


def _rewrite(arg: str) -> Action:
    name, _, text = arg.partition("=")
    fd = lookup(name)
    capability = name.removeprefix("version.")
    if name.startswith("version.") and capability in proto.CAPABILITIES:
        kind = proto.CAPABILITIES[capability][0]
        value = _json_value(text, kind, name)
        return Action("rewrite", field=name, value=value)
    width = proto.member_widths().get(name.rsplit(".", 1)[0] if fd is not None and fd.mask else name)
    if fd is None or width is None:
        raise FaultError(f"rewrite: {name!r} is not a field the proxy can rewrite: a VERSION "
                         "capability (version.max_data_xfer_size …) or a fixed-width field "
                         "(vfio_user.error, region_read.count …)")
    if fd.type == BOOL:
        value = _json_value(text, bool, name)
    else:
        symbol = fd.symbol_value(text)
        value = symbol if symbol is not None else _number(text, name)
    limit = (fd.mask >> _shift(fd.mask)) if fd.mask else (1 << 8 * width) - 1
    if not 0 <= int(value) <= limit:
        raise FaultError(f"rewrite: {name}={text} does not fit the field (0 to {limit:#x})")
    return Action("rewrite", field=name, value=int(value))


def _json_value(text: str, kind: type, name: str) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise FaultError(f"rewrite: {name} is true or false, not {text!r}")
        return text.lower() == "true"
    value = _number(text, name)
    if not 0 <= value < 1 << 63:
        raise FaultError(f"rewrite: {name}={text} is out of range")
    return value


def _number(text: str, name: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise FaultError(f"rewrite: {name} needs a number, not {text!r}") from None


def _shift(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


# --- deciding -------------------------------------------------------------------------

class FaultInjector:
    """The rules, with what each distinct header tells about them."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.memo: dict[tuple, tuple[Rule, ...]] = {}     # candidates(), by header

    def candidates(self, channel: int, direction: int, cmd: int, flags: int, error: int,
                   fds: int) -> tuple[Rule, ...]:
        """The rules that may match a message with this header."""
        key = (channel, direction, cmd, flags, error, fds)
        rules = self.memo.get(key)
        if rules is None:
            if len(self.memo) > _MEMO_LIMIT:      # headers of garbage: stay bounded
                self.memo.clear()
            known = _header_values(*key)
            rules = self.memo[key] = tuple(
                rule for rule in self.rules if rule.filter.could_match(known))
        return rules

    def decide(self, rules: tuple[Rule, ...], conn: int, channel: int, direction: int,
               data: bytes, fds: list[dict[str, Any]]) -> Fault | None:
        """The fault a whole candidate message gets, if any."""
        tree, header = proto.dissect_message(data, proto.Context(DIRECTIONS[direction], fds))
        values = tree.values()
        values.update({"frame": [None], "frame.conn": [conn], "frame.channel": [channel],
                       "frame.dir": [direction], "frame.len": [len(data)],
                       "frame.fds": [len(fds)]})
        for rule in rules:
            if not rule.filter.matches(values):
                continue
            effect = _apply(rule.action, data, header, tree)
            if effect is None or not rule.trigger.fires():
                continue
            delivered, answer, details = effect
            return Fault(rule, rule.action, delivered, answer,
                         _info(rule, header, channel, direction, details))
        return None


def _header_values(channel: int, direction: int, cmd: int, flags: int, error: int,
                   fds: int) -> PartialValues:
    values = {"frame": [None], "frame.channel": [channel], "frame.dir": [direction],
              "frame.fds": [fds], "vfio_user": [None], "vfio_user.cmd": [cmd],
              "vfio_user.flags": [flags],
              "vfio_user.error" if flags & proto.FLAG_ERROR else "vfio_user.reserved": [error]}
    for sub, value in bit_values(_FLAGS, flags):
        values[sub.name] = [value]

    def known(name: str) -> bool:
        if name in values or name in ("vfio_user.error", "vfio_user.reserved"):
            return True
        if name.split(".")[0] == "fd":
            return fds == 0                  # no fd: no fd field
        commands = proto.field_commands(name)
        return commands is not None and cmd not in commands    # another command's field
    return PartialValues(values, known)


def _apply(action: Action, data: bytes, header: proto.HeaderInfo | None, tree: Tree
           ) -> tuple[bytes, bytes | None, dict[str, Any]] | None:
    """(bytes to deliver, answer to the sender, record details), or None when the
    action does not apply to this message."""
    if header is None:
        return None
    name = action.name
    if name == "errno":
        if header.is_reply or header.no_reply or header.type != proto.TYPE_COMMAND:
            return None
        return data, error_to(data, action.errno), {"errno": action.errno}
    if name == "rewrite":
        rewritten = _rewritten(action, data, header, tree)
        if rewritten is None:
            return None
        new, old = rewritten
        return new, None, {"field": action.field, "from": old, "to": action.value}
    if name == "truncate":
        if len(data) <= action.size:
            return None
        cut = data[:4] + _SIZE.pack(action.size) + data[8:action.size]
        return cut, None, {"size": action.size, "from_size": len(data)}
    details = {"delay": {"delay": action.delay},
               "close": {"when": "after" if action.after else "before"}}.get(name, {})
    return data, None, details


def _rewritten(action: Action, data: bytes, header: proto.HeaderInfo, tree: Tree
               ) -> tuple[bytes, Any] | None:
    """The message with the field set, and the field's old value."""
    if action.field.startswith("version.") and action.field.removeprefix("version.") \
            in proto.CAPABILITIES:
        return _rewritten_capability(action, data, header)
    fd = lookup(action.field)
    item_name = action.field.rsplit(".", 1)[0] if fd.mask else action.field
    item = next((i for i in tree.walk() if i.field.name == item_name and i.offset >= 0), None)
    if item is None or not isinstance(item.value, int) or item.offset + item.length > len(data):
        return None
    if fd.mask:
        new = (item.value & ~fd.mask) | (int(action.value) << _shift(fd.mask)) & fd.mask
        old: Any = (item.value & fd.mask) >> _shift(fd.mask)
    else:
        new, old = int(action.value), item.value
    if new >= 1 << 8 * item.length:
        return None
    patched = new.to_bytes(item.length, "little")
    return data[:item.offset] + patched + data[item.offset + item.length:], old


def _rewritten_capability(action: Action, data: bytes, header: proto.HeaderInfo
                          ) -> tuple[bytes, Any] | None:
    start = proto.HEADER_SIZE + proto.Version.vfu_compiled.size
    if header.cmd != proto.CMD["VERSION"] or len(data) < start:
        return None
    try:
        doc = json.loads(data[start:].rstrip(b"\0") or b"{}")
    except (UnicodeDecodeError, ValueError):
        return None
    caps = doc.setdefault("capabilities", {}) if isinstance(doc, dict) else None
    if not isinstance(caps, dict):
        return None
    *parents, key = action.field.removeprefix("version.").split(".")
    for part in parents:
        caps = caps.setdefault(part, {})
        if not isinstance(caps, dict):
            return None
    old = caps.get(key)
    caps[key] = action.value
    body = data[proto.HEADER_SIZE:start] + json.dumps(doc).encode() + b"\0"
    return data[:4] + _SIZE.pack(proto.HEADER_SIZE + len(body)) + data[8:16] + body, old


def _info(rule: Rule, header: proto.HeaderInfo, channel: int, direction: int,
          details: dict[str, Any]) -> dict[str, Any]:
    return {"action": rule.action.name, "rule": rule.text, "number": rule.number,
            "match": rule.trigger.matches, "channel": CHANNELS[channel],
            "dir": DIRECTIONS[direction], "msg_id": header.msg_id, "cmd": header.command_name,
            "effect": _effect(rule.action, header, direction, details), **details}


def _effect(action: Action, header: proto.HeaderInfo, direction: int,
            details: dict[str, Any]) -> str:
    """What the fault did, in a sentence for people."""
    receiver = "server" if direction == C2S else "client"
    what = f"{header.command_name} {header.kind}"
    if action.name == "errno":
        return (f"{header.command_name} answered with "
                f"{proto.ERRNO_NAMES.get(action.errno, action.errno)} in place of the "
                f"{receiver}, not forwarded")
    if action.name == "delay":
        return f"{what} delivered {action.delay * 1e3:g} ms late"
    if action.name == "drop":
        return f"{what} dropped: the {receiver} never got it"
    if action.name == "close":
        return (f"connection closed {'after' if action.after else 'before'} {what} reached "
                f"the {receiver}")
    if action.name == "rewrite":
        return f"{what}: {action.field} rewritten from {details['from']} to {details['to']}"
    if action.name == "truncate":
        return (f"{what} cut from {details['from_size']} to {action.size} bytes "
                f"(msg_size {action.size})")
    return f"{what} delivered twice"


# --- the relay's side ------------------------------------------------------------------

@dataclass
class Verdict:
    """A held message a rule acts on: the proxy carries the fault out."""

    fault: Fault
    fds: list[int]


@dataclass
class Gate:
    """One direction of one channel when faults are configured.

    It follows the message boundaries as chunks pass: a message no rule may
    match (decided on its header) passes at once, in the same pieces the
    relay would send; one that a rule may match is held until whole, then
    decided.  `feed` returns what to forward: (bytes, fds) pieces, and a
    Verdict where a fault acts.  A reply the proxy makes for the other
    direction waits in `later` until this stream is between two messages.
    """

    injector: FaultInjector
    conn: int
    channel: int
    direction: int
    ordinal: int = 0                         # messages begun so far
    faults: dict[int, Fault] = field(default_factory=dict)   # by ordinal, for the capture
    later: list[bytes] = field(default_factory=list)
    lost: bool = False                       # msg_size < 16 seen: everything passes
    _passing: int = 0                        # bytes of the current message still to pass
    _head: bytearray = field(default_factory=bytearray)   # a header split over reads
    _head_fds: list[int] = field(default_factory=list)    # fds of the next message
    _held: bytearray | None = None
    _held_size: int = 0
    _held_fds: list[int] = field(default_factory=list)
    _held_rules: tuple[Rule, ...] = ()
    _passes: set[int] = field(default_factory=set)    # fd-less headers no rule may match
    _busy: bool = False                               # see _update_busy

    def completed(self) -> int:
        """Messages of the stream received whole so far (those begun, less the
        one still coming): the framer's count of frames."""
        return self.ordinal - bool(self._passing or self._held is not None)

    @property
    def between_messages(self) -> bool:
        return not (self._passing or self._head or self._held is not None)

    def all_pass(self, data: memoryview, fds: int, owner: int) -> bool:
        """The common case, decided fast: every message that begins in the chunk
        has a header no rule may match, so the chunk passes as it is.  Else
        (False, nothing changed) `feed` decides."""
        if self._busy:
            return False
        pos, end, count, passes = self._passing, len(data), 0, self._passes
        if not pos and not fds and end >= _HEADER_SIZE:     # most chunks: one whole message
            cmd, size, flags_error = _unpack_cmd_size_flags(data)
            if size == end and (flags_error << 16 | cmd) in passes:
                self.ordinal += 1
                return True
        while pos + _HEADER_SIZE <= end:
            cmd, size, flags_error = _unpack_cmd_size_flags(data, pos)
            if (flags_error << 16 | cmd) not in passes or size < _HEADER_SIZE \
                    or fds and pos == owner:
                return False
            pos += size
            count += 1
        if pos < end:
            return False                # a header cut by the read: feed keeps its start
        self._passing = pos - end
        self.ordinal += count
        return True

    def feed(self, data: memoryview, fds: list[int], owner: int) -> list[Any]:
        """The pieces of one chunk; its fds belong to the byte at `owner`."""
        out: list[Any] = []
        if fds and owner:
            self._consume(data[:owner], [], out)
            self._consume(data[owner:], fds, out)
        else:
            self._consume(data, fds, out)
        self._update_busy()
        return out

    def _update_busy(self) -> None:
        """Whether all_pass must leave the next chunk to feed (state only feed
        and answer change)."""
        self._busy = bool(self._head or self._held is not None or self.lost or self.later)

    def answer(self, data: bytes) -> bool:
        """A reply the proxy made, to go where this stream goes: True when it can
        be queued now, else it waits for the end of the current message."""
        if self.between_messages:
            return True
        self.later.append(data)
        self._busy = True
        return False

    def close(self) -> list[int]:
        """The fds still held, for the caller to close."""
        fds = self._head_fds + self._held_fds
        self._head_fds, self._held_fds = [], []
        return fds

    def _consume(self, seg: memoryview, fds: list[int], out: list[Any]) -> None:
        run = _Run(seg, out)                  # the pass-through bytes being gathered
        if fds:
            if self._passing or self.lost:
                run.fds = fds
            elif self._held is not None:
                self._held_fds += fds
            else:
                self._head_fds += fds
        pos, end = 0, len(seg)
        while pos < end:
            if self.lost:
                pos = end
            elif self._passing:
                step = min(self._passing, end - pos)
                self._passing -= step
                pos += step
            elif self._held is not None:
                step = min(self._held_size - len(self._held), end - pos)
                self._held += seg[pos:pos + step]
                pos += step
                run.restart(pos)
                if len(self._held) == self._held_size:
                    self._decide(out)
            elif self._head or end - pos < proto.HEADER_SIZE:
                pos = self._gather_head(seg, pos, run, out)
            elif self._begin(seg, pos):
                run.flush(pos)
                self._held = bytearray()
                self._held_fds, self._head_fds = self._head_fds, []
            elif self._head_fds:
                run.flush(pos)
                run.fds, self._head_fds = self._head_fds, []
            if self.later and self.between_messages:
                run.flush(pos)
                out.extend((data, []) for data in self.later)
                self.later.clear()
        run.flush(pos)

    def _gather_head(self, seg: memoryview, pos: int, run: _Run, out: list[Any]) -> int:
        """A header split over reads: keep its start until it is whole."""
        run.flush(pos)
        step = min(proto.HEADER_SIZE - len(self._head), len(seg) - pos)
        self._head += seg[pos:pos + step]
        pos += step
        run.restart(pos)
        if len(self._head) == proto.HEADER_SIZE:
            head, self._head = bytes(self._head), bytearray()
            if self._begin(head, 0):
                self._held = bytearray(head)
                self._held_fds, self._head_fds = self._head_fds, []
            else:
                out.append((head, self._head_fds))
                self._head_fds = []
                self._passing = max(self._passing - proto.HEADER_SIZE, 0)
        return pos

    def _begin(self, buf: Any, pos: int) -> bool:
        """A message starts at buf[pos:]: hold it (True) or let it pass."""
        self.ordinal += 1
        _, cmd, size, flags, error = _HEADER.unpack_from(buf, pos)
        if size < proto.HEADER_SIZE:
            self.lost = True                 # as the framer: no boundaries any more
            return False
        if size > DEFAULT_MAX_MESSAGE:       # the framer keeps no more of it either
            self._passing = size
            return False
        rules = self.injector.candidates(self.channel, self.direction, cmd, flags, error,
                                         len(self._head_fds))
        if not rules and not self._head_fds and len(self._passes) < _MEMO_LIMIT:
            self._passes.add((error << 32 | flags) << 16 | cmd)       # for all_pass
        if not rules:
            self._passing = size
            return False
        self._held_rules, self._held_size = rules, size
        return True

    def _decide(self, out: list[Any]) -> None:
        from .sockio import fd_info
        data, fds = bytes(self._held), self._held_fds
        self._held, self._held_fds = None, []
        fault = self.injector.decide(self._held_rules, self.conn, self.channel, self.direction,
                                     data, [fd_info(fd) for fd in fds])
        if fault is None:
            out.append((data, fds))
        else:
            self.faults[self.ordinal] = fault
            out.append(Verdict(fault, fds))


class _Run:
    """Consecutive bytes of a chunk that pass unchanged: one piece, one sendmsg."""

    __slots__ = ("seg", "out", "start", "fds")

    def __init__(self, seg: memoryview, out: list[Any]) -> None:
        self.seg, self.out, self.start, self.fds = seg, out, 0, []

    def flush(self, end: int) -> None:
        if end > self.start or self.fds:
            self.out.append((self.seg[self.start:end], self.fds))
        self.start, self.fds = end, []

    def restart(self, start: int) -> None:
        self.start = start


def duplicate_fds(fds: list[int]) -> list[int]:
    return [os.dup(fd) for fd in fds]
