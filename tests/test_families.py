"""One place per command: each command of the spec's table has its request and
reply dissector in one family module, and its layers and session code sit
in that same module."""

from __future__ import annotations

import pytest

from vfu_inspect.dissectors import vfio_user as proto

SPEC_COMMANDS = sorted(set(proto.COMMANDS) - proto.OBSOLETE_COMMANDS)


def _family_of(cmd: int):
    """The families that dissect `cmd`'s requests or replies."""
    return [family for family in proto.COMMAND_FAMILIES
            if cmd in family.DISSECTORS.requests or cmd in family.DISSECTORS.replies]


@pytest.mark.parametrize("cmd", SPEC_COMMANDS, ids=[proto.COMMANDS[c] for c in SPEC_COMMANDS])
def test_every_command_has_both_dissectors_in_one_family(cmd):
    families = _family_of(cmd)
    assert len(families) == 1, [f.__name__ for f in families]
    assert cmd in families[0].DISSECTORS.requests and cmd in families[0].DISSECTORS.replies
    assert proto.REQUESTS[cmd] is families[0].DISSECTORS.requests[cmd]
    assert proto.REPLIES[cmd] is families[0].DISSECTORS.replies[cmd]


@pytest.mark.parametrize("family", proto.COMMAND_FAMILIES, ids=lambda f: f.__name__)
def test_a_familys_layers_and_session_code_are_for_its_own_commands(family):
    own = set(family.DISSECTORS.requests) | set(family.DISSECTORS.replies)
    layer_commands = {proto.CMD[getattr(cls, "vfu_command", cls.vfu_name)]
                      for cls in proto.layers() if cls.__module__ == family.__name__
                      and getattr(cls, "vfu_command", cls.vfu_name) in proto.CMD}
    rules = family.SESSION
    handled = (set(rules.command_checks) | set(rules.reply_applies) | set(rules.effects)
               | set(rules.echoes) | rules.argsz_bounded)
    assert layer_commands <= own
    assert handled <= own


def test_the_package_gathers_every_familys_checks_and_fields_once():
    ids = [row[0] for row in proto.CHECKS]
    assert len(ids) == len(set(ids)) == sum(len(f.CHECKS) for f in proto.FAMILIES)
    assert len(list(proto.FIELDS)) == sum(len(list(f.FIELDS)) for f in proto.FAMILIES)
    refused = set().union(*(f.SESSION.must_refuse for f in proto.COMMAND_FAMILIES),
                          proto.header.MUST_REFUSE)
    assert proto.SESSION.must_refuse == refused <= set(ids)


@pytest.mark.parametrize("family", proto.COMMAND_FAMILIES, ids=lambda f: f.__name__)
def test_a_familys_declared_payloads_are_of_commands_it_dissects(family):
    declared = family.DISSECTORS.payloads
    assert {cmd for cmd, _ in declared} <= set(family.DISSECTORS.requests) | set(
        family.DISSECTORS.replies)
    for (cmd, kind), payload in declared.items():
        assert (payload.command, payload.kind) == (proto.COMMANDS[cmd], kind)
        assert payload.layer is None or payload.layer.__module__ == family.__name__


def test_a_payload_naming_a_member_its_layer_lacks_is_refused():
    from vfu_inspect.dissectors.vfio_user.core import Payload, Rest
    with pytest.raises(ValueError, match="no member cnt"):
        Payload(proto.IrqInfo, Rest("irq_info.data", "cnt"))


def test_a_summary_naming_a_member_or_format_the_layer_lacks_is_refused():
    from vfu_inspect.dissectors.vfio_user.core import Payload
    with pytest.raises(ValueError, match="no member cnt"):
        Payload(proto.IrqInfo, info="count={cnt}")
    with pytest.raises(ValueError, match="no summary format hexx"):
        Payload(proto.IrqInfo, info="count={count:hexx}")


def test_a_declared_summary_renders_each_format():
    from vfu_inspect.dissectors.vfio_user.core import Payload, render_info
    payload = Payload(proto.IrqInfo, info="{index:irq} {count} {count:#x} {flags:flags} {argsz:region}")
    values = {"argsz": 2, "flags": 0x3, "index": 9, "count": 255}
    assert render_info(payload, values) == "index 9 255 0xff EVENTFD|MASKABLE BAR2"


def test_a_family_keeps_its_connection_state_and_its_section_of_the_view():
    from vfu_inspect.dissectors.vfio_user.state import ConnState, SessionRules
    mine, theirs = SessionRules(), SessionRules()
    mine.table("widgets", list)
    mine.section("Widgets")(lambda state: [f"{len(state.widgets)} widgets"])
    merged = SessionRules.merged([mine, theirs])
    state = ConnState(3, merged)
    state.widgets.append(1)
    assert ConnState(4, merged).widgets == []               # each connection its own
    assert dict(state.sections())["Widgets"] == ["1 widgets"]
    theirs.table("widgets", dict)
    with pytest.raises(ValueError, match="kept by two families"):
        SessionRules.merged([mine, theirs])


def test_every_state_view_section_comes_from_the_family_that_keeps_it():
    from vfu_inspect.dissectors.vfio_user.state import ConnState
    titles = [title for title, _ in ConnState(0, proto.SESSION).sections()]
    assert titles == ["Negotiation", "DMA maps", "Regions", "IRQs", "Migration", "In flight"]
