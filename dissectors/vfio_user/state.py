"""A connection's state as its receiver sees it, and the types the command
families' session code reads and changes: a request in flight (Pending), a
request's effect applied ahead of its reply (Effect, EffectKind), and
`SessionRules`, the table a family files its request checks, reply applies
and effects in, with the connection state it keeps (its tables: DMA maps,
regions, IRQs, the migration state) and how the state view shows them.  It
imports no family: the families import it, and session.py's tracker runs
what they filed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from vfu_inspect.records import C2S
from vfu_inspect.tree import Expert, Tree

from .core import file_under, merge_by_command
from .protocol import CAPABILITIES, CMD, COMMANDS, PAGE_4K

if TYPE_CHECKING:
    from vfu_inspect.packet import Dissected


@dataclass(slots=True)
class Pending:
    """A request in flight."""

    number: int
    cmd: int
    msg_id: int
    direction: int
    channel: int
    ts_ns: int
    data: bytes           # its first REQUEST_KEPT bytes: what reply dissectors read
    fds: list[dict[str, Any]]
    values: dict[str, Any] = field(default_factory=dict)   # its layer's fields
    must_refuse: list[Expert] = field(default_factory=list)
    timed_out: bool = False
    effect: Effect | None = None    # applied ahead of the reply


@dataclass(slots=True)
class Effect:
    """A request's change to the receiver's state, applied in stream order
    before its reply arrives; `saved` is what undoing it needs."""

    number: int
    cmd: int
    values: dict[str, Any]
    fds: list[dict[str, Any]]
    kind: EffectKind                # how to apply and undo it: its command's
    saved: Any = None
    answered: bool = False


class ConnState:
    """One connection: the negotiation and what is in flight, which every
    family reads, and each family's own tables (`SessionRules.table`), as
    attributes of their names."""

    def __init__(self, conn: int, rules: SessionRules) -> None:
        self.rules = rules
        self.conn = conn
        self.version_sent = False
        self.client_version: tuple[int, int] | None = None
        self.server_version: tuple[int, int] | None = None
        self.client_caps: dict[str, Any] = {}
        self.server_caps: dict[str, Any] = {}
        self.twin = False
        self.device: dict[str, int] | None = None
        self.qemu_dma: str | None = None         # why the client uses QEMU's DMA layout
        self.inflight: dict[int, Pending] = {}   # by request number, oldest first
        self.by_key: dict[tuple[int, int, int], list[int]] = {}
        self.posted: dict[tuple[int, int, int], int] = {}   # NO_REPLY requests
        self.effects: list[Effect] = []          # applied ahead of replies, stream order
        self.closed = False
        for name, make in self.rules.tables.items():
            setattr(self, name, make())

    # --- negotiated values ------------------------------------------------------

    def cap(self, caps: dict[str, Any], name: str) -> Any:
        return caps.get(name, CAPABILITIES[name][1])

    def receiver_caps(self, direction: int) -> dict[str, Any] | None:
        """The capabilities of whoever receives a message sent in `direction`."""
        if self.server_version is None:
            return None
        return self.server_caps if direction == C2S else self.client_caps

    @property
    def page_size(self) -> int:
        pgsizes = self.cap(self.server_caps, "pgsizes")
        return pgsizes & -pgsizes if pgsizes else PAGE_4K

    # --- in flight --------------------------------------------------------------

    def answer(self, channel: int, direction: int, msg_id: int) -> Pending | None:
        """The oldest request that a reply sent in `direction` answers."""
        key = (channel, 1 - direction, msg_id)
        numbers = self.by_key.get(key)
        if not numbers:
            return None
        number = numbers.pop(0)
        if not numbers:
            del self.by_key[key]
        return self.inflight.pop(number)

    # --- effects ahead of replies -------------------------------------------------

    def apply(self, effect: Effect) -> None:
        effect.saved = effect.kind.apply(self, effect)

    def settle(self, effect: Effect) -> None:
        """Its reply was a success: the effect stays."""
        effect.answered = True
        while self.effects and self.effects[0].answered:
            self.effects.pop(0)

    def retract(self, effect: Effect) -> list[tuple[Effect, str, str]]:
        """Its reply was an error: undo it and what was applied on top of it,
        then apply the later effects again.  Returns what the later requests
        now break (effect, expert id, message): the receiver must refuse them."""
        i = self.effects.index(effect)
        for later in reversed(self.effects[i:]):
            later.kind.undo(self, later)
        del self.effects[i]
        broken = []
        for later in self.effects[i:]:
            kind = later.kind
            problem = kind.conflict(self, later.values) if kind.conflict else None
            if problem:
                broken.append((later, *problem))
            self.apply(later)
        return broken

    def sections(self, at_ns: int | None = None) -> list[tuple[str, list[str]]]:
        """The state as titled sections of text lines, for the views."""
        return [("Negotiation", self._negotiation_lines()),
                *((title, lines(self)) for title, lines in self.rules.sections),
                ("In flight", self._inflight_lines(at_ns))]

    def _negotiation_lines(self) -> list[str]:
        if self.server_version is None:
            return ["VERSION not answered yet" if self.version_sent else "no VERSION yet"]
        lines = [f"client {self.client_version[0]}.{self.client_version[1]}, "
                 f"server {self.server_version[0]}.{self.server_version[1]}"]
        for name, (_, default, label) in CAPABILITIES.items():
            client, server = self.client_caps.get(name), self.server_caps.get(name)
            if client is not None or server is not None:
                lines.append(f"{label}: client {_shown(client, default)}, "
                             f"server {_shown(server, default)}")
        lines.append(f"twin socket: {'yes' if self.twin else 'no'}")
        if self.device:
            lines.append(f"device: {self.device['num_regions']} regions, "
                         f"{self.device['num_irqs']} IRQ indexes, flags {self.device['flags']:#x}")
        return lines

    def _inflight_lines(self, at_ns: int | None) -> list[str]:
        lines = []
        for p in self.inflight.values():
            age = f", {(at_ns - p.ts_ns) / 1e6:.3f} ms" if at_ns is not None else ""
            arrow = "C→S" if p.direction == C2S else "C←S"
            effect = (f"; applied ahead of its reply: {p.effect.kind.describe(p.effect.values)}"
                      if p.effect else "")
            lines.append(f"{arrow} frame {p.number} {COMMANDS.get(p.cmd, p.cmd)} "
                         f"msg_id {p.msg_id:#06x}{age}{effect}")
        return lines or ["none"]


def _shown(value: Any, default: Any) -> str:
    return f"{default} (default)" if value is None else str(value)


# --- effects: what a request changes, applied ahead of its reply ----------------------------
# Each kind applies an effect (returning what undoing it needs) and undoes it;
# undoing runs newest first, so an undo only has to restore what its apply saw.
# `conflict` says what a request breaks in a given state (an expert id and
# message), for the request check and when an earlier request is retracted;
# `migration`: it may change the device state, which the Migration view
# shows as in flight until its reply.

Conflict = tuple[str, str] | None


@dataclass(frozen=True)
class EffectKind:
    apply: Callable[[ConnState, Effect], Any]
    undo: Callable[[ConnState, Effect], None]
    describe: Callable[[dict[str, Any]], str]
    conflict: Callable[[ConnState, dict[str, Any]], Conflict] | None = None
    migration: bool = False


    def __deepcopy__(self, memo: dict[int, Any]) -> EffectKind:
        return self         # functions only: every checkpoint's effects share it


def raise_conflict(tree: Tree, problem: Conflict) -> None:
    if problem:
        tree.expert(*problem)


# --- what a family files ------------------------------------------------------------

# A command check returns the values its reply will need (or None).
CommandCheck = Callable[[ConnState, "Dissected"], "dict[str, Any] | None"]
ReplyApply = Callable[[ConnState, "Dissected", Pending], None]
# A family's section of the state view: its lines for a connection.
Section = Callable[[ConnState], list[str]]
# A success reply's check that it repeats what its request asked.
EchoCheck = Callable[["Dissected", Pending], None]


class SessionRules:
    """One family's part in the session tracker, by command: the request
    checks, what a success reply applies, the effects applied ahead of
    replies; the connection state it keeps (its tables, each made fresh for
    a connection) and its section of the state view; and for the tracker's
    own reply checks, the ids of the checks whose requests the receiver must
    refuse (with the errno it must give, where the spec names one), the
    commands whose request argsz bounds the reply, and what a reply echoes."""

    def __init__(self, must_refuse: Iterable[str] = (),
                 refusal_errno: dict[str, tuple[str, int]] | None = None,
                 argsz_bounded: Iterable[str] = (),
                 echoes: dict[str, EchoCheck] | None = None) -> None:
        self.command_checks: dict[int, CommandCheck] = {}
        self.reply_applies: dict[int, ReplyApply] = {}
        self.effects: dict[int, EffectKind] = {}
        self.tables: dict[str, Callable[[], Any]] = {}
        self.sections: list[tuple[str, Section]] = []
        self.must_refuse = set(must_refuse)
        self.refusal_errno = dict(refusal_errno or {})
        self.argsz_bounded = {CMD[name] for name in argsz_bounded}
        self.echoes = {CMD[name]: check for name, check in (echoes or {}).items()}

    @classmethod
    def merged(cls, families: Iterable[SessionRules]) -> SessionRules:
        """Every family's rules in one table; a command is one family's."""
        out = cls()
        for rules in families:
            for mine, theirs in ((out.command_checks, rules.command_checks),
                                 (out.reply_applies, rules.reply_applies),
                                 (out.effects, rules.effects), (out.echoes, rules.echoes)):
                merge_by_command(mine, theirs)
            twice = out.tables.keys() & rules.tables.keys()
            if twice:
                raise ValueError(f"connection state {sorted(twice)} kept by two families")
            out.tables |= rules.tables
            out.sections += rules.sections
            out.must_refuse |= rules.must_refuse
            out.refusal_errno.update(rules.refusal_errno)
            out.argsz_bounded |= rules.argsz_bounded
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> SessionRules:
        return self         # tables of functions: every checkpoint's state shares them

    def table(self, name: str, make: Callable[[], Any]) -> None:
        """Keep `make()` in each connection's state, as its attribute `name`."""
        self.tables[name] = make

    def section(self, title: str) -> Callable[[Section], Section]:
        """Files the family's section of the state view, titled `title`."""
        def wrap(lines: Section) -> Section:
            self.sections.append((title, lines))
            return lines
        return wrap

    def on_command(self, *names: str) -> Callable[[CommandCheck], CommandCheck]:
        return file_under(self.command_checks, names)

    def on_reply(self, *names: str) -> Callable[[ReplyApply], ReplyApply]:
        return file_under(self.reply_applies, names)

    def effect(self, name: str, kind: EffectKind) -> None:
        self.effects[CMD[name]] = kind

    def echo(self, *names: str) -> Callable[[EchoCheck], EchoCheck]:
        """Files an echo check of its own, where `echoed_fields` will not do."""
        return file_under(self.echoes, names)


def echoed_fields(prefix: str, names: tuple[str, ...]) -> EchoCheck:
    """The echo check of a reply that repeats these fields of its request's
    layer `prefix`."""
    def check(p: Dissected, request: Pending) -> None:
        got = p.tree.prefixed(prefix)
        differ = [f"{name} {got[name]:#x} (asked {request.values[name]:#x})"
                  for name in names if name in got and name in request.values
                  and got[name] != request.values[name]]
        if differ:
            p.tree.expert("reply.echo_mismatch", f"reply gives {', '.join(differ)}")
    return check


# --- what the families' checks share --------------------------------------------------

def describe_fd(fds: list[dict[str, Any]], index: int = 0) -> str:
    if index >= len(fds):
        return "none"
    meta = fds[index]
    text = meta.get("kind", "fd")
    if meta.get("size") is not None:
        text += f" {meta['size']:#x}"
    return text + (f" inode {meta['inode']}" if meta.get("inode") else "")



def check_xfer(state: ConnState, tree: Tree, direction: int, count: int) -> None:
    caps = state.receiver_caps(direction)
    if caps is not None:
        limit = state.cap(caps, "max_data_xfer_size")
        if count > limit:
            tree.expert("xfer.too_big", f"{count} bytes, max_data_xfer_size is {limit}")

