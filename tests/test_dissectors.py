"""Every command, request and reply: built with the scapy layers, dissected back."""

from __future__ import annotations

import json
import struct

import pytest

from vfu_inspect.dissectors.vfio_user import (
    CMD, COMMANDS, OBSOLETE_COMMANDS, Context, DeviceFeature, DeviceInfo, DirtyBitmap, DmaLogging,
    DmaLoggingRange, DmaLoggingReport, DmaMap, DmaRead, DmaUnmap, DmaWrite, Header, IrqInfo,
    MigDataRead, MigDataWrite, MigDeviceState, MigrationFeature, QemuDmaRead, RegionCap,
    RegionInfo, RegionIoFds, RegionRead, RegionType, RegionWrite, SetIrqs, ShadowSubRegion,
    SERVER_COMMANDS, SparseArea, SparseMmap, SubRegion, Version, WriteMulti, WriteMultiEntry,
    dissect_message)

REQ, REPLY, ERR = 0, 1, 0x21


def msg(cmd: str, flags: int = REQ, *layers, msg_id: int = 0x42) -> bytes:
    packet = Header(msg_id=msg_id, cmd=CMD[cmd], flags=flags)
    for layer in layers:
        packet = packet / layer
    return bytes(packet)


def caps_json(caps: dict) -> bytes:
    return json.dumps({"capabilities": caps}).encode() + b"\0"


DMA_READ_REQ = msg("DMA_READ", REQ, DmaRead(address=0x1000, count=8))
DMA_WRITE_REQ = msg("DMA_WRITE", REQ, DmaWrite(address=0x2000, count=4, data=b"ABCD"))
MIG_READ_REQ = msg("MIG_DATA_READ", REQ, MigDataRead(argsz=8 + 64, size=64))

# name -> (message, fds, request, expected field values, words the info must show)
CASES = {
    "version request": (msg("VERSION", REQ, Version(major=0, minor=2, json=caps_json(
        {"max_msg_fds": 16, "max_data_xfer_size": 4096, "pgsizes": 4096,
         "migration": {"pgsize": 4096, "max_bitmap_size": 65536},
         "twin_socket": {"supported": True}, "write_multiple": True}))), [], None,
        {"version.minor": [2], "version.max_msg_fds": [16], "version.max_data_xfer_size": [4096],
         "version.migration.pgsize": [4096], "version.migration.max_bitmap_size": [65536],
         "version.twin_socket.supported": [True], "version.write_multiple": [True]}, ["0.2"]),
    "version reply with twin": (msg("VERSION", REPLY, Version(major=0, minor=1, json=caps_json(
        {"twin_socket": {"supported": True, "fd_index": 0}}))), [{"kind": "socket"}], None,
        {"version.twin_socket.fd_index": [0], "fd.purpose": [
            "twin socket (server-to-client commands)"]}, ["0.1"]),
    "dma_map with fd": (msg("DMA_MAP", REQ, DmaMap(flags=3, offset=0x100000, address=0xC0000,
                                                   size=0x20000)), [{"kind": "memfd"}], None,
        {"dma_map.address": [0xC0000], "dma_map.size": [0x20000], "dma_map.offset": [0x100000],
         "dma_map.flags.read": [True], "dma_map.flags.write": [True],
         "fd.purpose": ["DMA memory for iova 0xc0000-0xe0000 (file offset 0x100000)"]},
        ["iova=0xc0000", "prot=RW", "fd=memfd"]),
    "dma_map reply": (msg("DMA_MAP", REPLY), [], None, {"vfio_user.cmd": [2]}, []),
    "dma_unmap": (msg("DMA_UNMAP", REQ, DmaUnmap(address=0x1000, size=0x2000)), [], None,
        {"dma_unmap.address": [0x1000], "dma_unmap.size": [0x2000]}, ["iova=0x1000"]),
    "dma_unmap all": (msg("DMA_UNMAP", REQ, DmaUnmap(flags=2)), [], None,
        {"dma_unmap.flags.all": [True]}, ["ALL"]),
    "dma_unmap dirty bitmap reply": (msg("DMA_UNMAP", REPLY, DmaUnmap(
        argsz=24 + 16 + 8, flags=1, address=0, size=0x40000),
        DirtyBitmap(pgsize=0x1000, size=8, data=b"\x81" + bytes(7))), [], None,
        {"dma_unmap.bitmap.pgsize": [0x1000], "dma_unmap.bitmap.size": [8],
         "dma_unmap.bitmap.data": [b"\x81" + bytes(7)]}, ["dirty bitmap"]),
    "device_info request": (msg("DEVICE_GET_INFO", REQ, DeviceInfo()), [], None,
        {"device_info.argsz": [16]}, []),
    "device_info reply": (msg("DEVICE_GET_INFO", REPLY, DeviceInfo(flags=3, num_regions=9,
                                                                   num_irqs=5)), [], None,
        {"device_info.num_regions": [9], "device_info.flags.reset": [True]},
        ["regions=9", "irqs=5"]),
    "region_info request": (msg("DEVICE_GET_REGION_INFO", REQ, RegionInfo(index=7)), [], None,
        {"region_info.index": [7]}, ["CONFIG"]),
    "region_info sparse": (msg("DEVICE_GET_REGION_INFO", REPLY, RegionInfo(
        argsz=80, flags=0xF, index=1, cap_offset=32, size=0x4000),
        RegionCap(id=1, version=1, next=0), SparseMmap(nr_areas=2),
        SparseArea(offset=0, size=0x1000), SparseArea(offset=0x2000, size=0x1000)),
        [{"kind": "memfd"}], None,
        {"region_info.area.offset": [0, 0x2000], "region_info.area.size": [0x1000, 0x1000],
         "region_info.cap.id": [1], "fd.purpose": ["mmap fd of region BAR1 (offset 0x0)"]},
        ["BAR1", "size=0x4000", "caps"]),
    "region_info type cap": (msg("DEVICE_GET_REGION_INFO", REPLY, RegionInfo(
        argsz=48, flags=0x9, index=9, cap_offset=32, size=0x100),
        RegionCap(id=2, version=1, next=0), RegionType(type=3, subtype=1)), [], None,
        {"region_info.type.type": [3], "region_info.type.subtype": [1]}, ["region 9"]),
    "region_io_fds request": (msg("DEVICE_GET_REGION_IO_FDS", REQ, RegionIoFds(index=0)), [],
        None, {"region_io_fds.index": [0]}, ["BAR0"]),
    "region_io_fds 40": (msg("DEVICE_GET_REGION_IO_FDS", REPLY, RegionIoFds(
        argsz=56, index=0, count=1), SubRegion(offset=0x28, size=8, fd_index=0, type=0)),
        [{"kind": "eventfd"}], None,
        {"region_io_fds.sub.offset": [0x28], "fd.purpose": [
            "ioeventfd for BAR0 offset 0x28 (sub-region 0)"]}, ["1 sub-regions"]),
    "irq_info request": (msg("DEVICE_GET_IRQ_INFO", REQ, IrqInfo(index=2)), [], None,
        {"irq_info.index": [2]}, []),
    "irq_info": (msg("DEVICE_GET_IRQ_INFO", REPLY, IrqInfo(flags=1, index=2, count=4)), [],
        None, {"irq_info.index": [2], "irq_info.count": [4]}, ["MSI-X", "count=4"]),
    "set_irqs eventfd": (msg("DEVICE_SET_IRQS", REQ, SetIrqs(flags=0x24, index=2, start=1,
                                                             count=2)),
        [{"kind": "eventfd"}, {"kind": "eventfd"}], None,
        {"set_irqs.start": [1], "set_irqs.flags.trigger": [True], "fd.purpose": [
            "eventfd of MSI-X vector 1", "eventfd of MSI-X vector 2"]}, ["TRIGGER", "fds=2"]),
    "set_irqs bool": (msg("DEVICE_SET_IRQS", REQ, SetIrqs(argsz=23, flags=0x22, index=2,
                                                          count=3, data=b"\1\0\1")), [], None,
        {"set_irqs.bool": [1, 0, 1]}, ["data=bool"]),
    "set_irqs reply": (msg("DEVICE_SET_IRQS", REPLY), [], None, {"vfio_user.cmd": [8]}, []),
    "region_read": (msg("REGION_READ", REQ, RegionRead(offset=0x10, region=0, count=4)), [],
        None, {"region_read.offset": [0x10], "region_read.count": [4]}, ["BAR0"]),
    "region_read reply": (msg("REGION_READ", REPLY, RegionRead(offset=0, region=7, count=4,
                                                               data=b"\xf4\x1a\x00\x10")),
        [], None, {"region_read.data": [b"\xf4\x1a\x00\x10"]}, ["data=0x10001af4"]),
    "region_write posted": (msg("REGION_WRITE", 0x10, RegionWrite(offset=8, region=0, count=2,
                                                                  data=b"\x01\x02")),
        [], None, {"vfio_user.flags.no_reply": [True], "region_write.data": [b"\x01\x02"]},
        ["data=0x0201"]),
    "region_write reply": (msg("REGION_WRITE", REPLY, RegionWrite(offset=8, region=0, count=2)),
        [], None, {"region_write.count": [2]}, []),
    "write_multi": (msg("REGION_WRITE_MULTI", 0x10, WriteMulti(wr_cnt=2),
                        WriteMultiEntry(offset=8, region=0, count=4, data=b"abcd" + bytes(4)),
                        WriteMultiEntry(offset=16, region=2, count=8, data=b"12345678")),
        [], None, {"write_multi.entry.offset": [8, 16], "write_multi.entry.region": [0, 2]},
        ["2 writes"]),
    "write_multi reply": (msg("REGION_WRITE_MULTI", REPLY, WriteMulti(wr_cnt=2)), [], None,
        {"write_multi.wr_cnt": [2]}, ["2 completed"]),
    "dma_read request": (DMA_READ_REQ, [], None, {"dma_read.count": [8]}, ["addr=0x1000"]),
    "dma_read reply": (msg("DMA_READ", REPLY, DmaRead(address=0x1000, count=8,
                                                      data=b"12345678")),
        [], DMA_READ_REQ, {"dma_read.data": [b"12345678"]}, ["count=8"]),
    "dma_write request": (DMA_WRITE_REQ, [], None, {"dma_write.data": [b"ABCD"]}, ["count=4"]),
    "dma_write reply": (msg("DMA_WRITE", REPLY, DmaWrite(address=0x2000, count=4)), [],
        DMA_WRITE_REQ, {"dma_write.address": [0x2000]}, ["addr=0x2000"]),
    "device_reset": (msg("DEVICE_RESET"), [], None, {"vfio_user.cmd": [13]}, []),
    "device_reset reply": (msg("DEVICE_RESET", REPLY), [], None, {"vfio_user.flags.type": [1]},
        []),
    "feature migration get reply": (msg("DEVICE_FEATURE", REPLY, DeviceFeature(
        argsz=16, flags=(1 << 16) | 1), MigrationFeature(flags=5)), [], None,
        {"migration.flags.stop_copy": [True], "migration.flags.pre_copy": [True],
         "device_feature.flags.feature": [1]}, ["GET MIGRATION", "STOP_COPY|PRE_COPY"]),
    "feature device state": (msg("DEVICE_FEATURE", REQ, DeviceFeature(argsz=16, flags=(1 << 17) | 2),
                                 MigDeviceState(device_state=3, data_fd=0xFFFFFFFF)), [], None,
        {"mig_state.device_state": [3]}, ["SET MIG_DEVICE_STATE", "state=STOP_COPY"]),
    "feature logging start": (msg("DEVICE_FEATURE", REQ, DeviceFeature(argsz=40, flags=(1 << 17) | 6),
                                  DmaLogging(page_size=0x1000, num_ranges=1),
                                  DmaLoggingRange(iova=0x10000, length=0x8000)), [], None,
        {"dma_logging.range.iova": [0x10000], "dma_logging.range.length": [0x8000]},
        ["DMA_LOGGING_START", "ranges=1"]),
    "feature logging report reply": (msg("DEVICE_FEATURE", REPLY, DeviceFeature(
        argsz=40, flags=(1 << 16) | 8),
        DmaLoggingReport(iova=0, length=0x40000, page_size=0x1000, bitmap=b"\x08" + bytes(7))),
        [], None, {"dma_logging_report.bitmap": [b"\x08" + bytes(7)]}, ["DMA_LOGGING_REPORT"]),
    "mig_data_read request": (MIG_READ_REQ, [], None, {"mig_data_read.size": [64]}, ["size=64"]),
    "mig_data_read reply": (msg("MIG_DATA_READ", REPLY, MigDataRead(argsz=8 + 64, size=64,
                                                                   data=bytes(range(64)))),
        [], MIG_READ_REQ, {"mig_data_read.data": [bytes(range(64))]}, ["size=64"]),
    "mig_data_write": (msg("MIG_DATA_WRITE", REQ, MigDataWrite(argsz=8 + 3, size=3, data=b"xyz")),
        [], None, {"mig_data_write.data": [b"xyz"]}, ["size=3"]),
    "mig_data_write reply": (msg("MIG_DATA_WRITE", REPLY), [], None, {"vfio_user.cmd": [18]}, []),
    "error reply": (msg("REGION_READ", ERR) [:12] + struct.pack("<I", 22), [], None,
        {"vfio_user.error": [22], "vfio_user.flags.error": [True]}, ["EINVAL"]),
}


def dissect(data: bytes, fds=(), request=None):
    """Dissect as its sender would send it: the server sends DMA_READ/WRITE
    and the replies to the client's commands."""
    cmd, _, h = struct.unpack_from("<HII", data, 2) if len(data) >= 12 else (0, 0, 0)
    from_server = (h & 0xF == 1) != (cmd in SERVER_COMMANDS)
    return dissect_message(data, Context("s2c" if from_server else "c2s", list(fds), request))[0]


@pytest.mark.parametrize("name", CASES)
def test_valid_message_dissects_back_to_its_fields(name):
    data, fds, request, expected, words = CASES[name]
    tree = dissect(data, fds, request)
    values = tree.values()
    for field, value in expected.items():
        assert values.get(field) == value, field
    assert [e for e in tree.experts if e.severity in ("error", "warning")] == []
    for word in words:
        assert word in tree.info


def test_every_command_of_the_spec_is_covered_request_and_reply():
    covered = {(struct.unpack_from("<H", case[0], 2)[0], case[0][8] & 0xF == REPLY)
               for case in CASES.values()}
    assert covered >= {(cmd, is_reply) for cmd in set(COMMANDS) - OBSOLETE_COMMANDS
                       for is_reply in (False, True)}


def test_truncated_region_info_reply_is_a_note():
    """libvfio-user's truncated reply: CAPS only once the capabilities fit."""
    data = msg("DEVICE_GET_REGION_INFO", REPLY, RegionInfo(argsz=80, flags=0x7, index=1,
                                                           size=0x4000))
    tree = dissect(data)
    assert [(e.severity, e.id) for e in tree.experts] == [("note", "argsz.truncated")]


def test_truncated_region_info_reply_with_caps_is_what_qemu_refuses():
    """Linux VFIO's truncated reply keeps CAPS with cap_offset 0."""
    data = msg("DEVICE_GET_REGION_INFO", REPLY, RegionInfo(argsz=80, flags=0xF, index=1,
                                                           size=0x4000))
    assert [(e.severity, e.id) for e in dissect(data).experts] == [
        ("note", "argsz.truncated"), ("note", "interop.region_caps_offset")]


def test_qemu_dma_layouts_decode_and_are_flagged():
    read_req = msg("DMA_READ", REQ, DmaRead(address=0x1000, count=8))
    qemu_read = msg("DMA_READ", REPLY, QemuDmaRead(address=0x1000, count=8,
                                                   data=b"ABCDEFGH" + bytes(4)))
    tree = dissect(qemu_read, request=read_req)
    assert tree.values()["dma_read.data"] == [b"ABCDEFGH" + bytes(4)]
    assert [e.id for e in tree.experts] == ["interop.dma_qemu_layout"]
    bare = dissect(msg("DMA_WRITE", REPLY), request=DMA_WRITE_REQ)
    assert [e.id for e in bare.experts] == ["interop.dma_write_bare_reply"]


def test_shadow_io_fds_decode_with_a_note():
    data = msg("DEVICE_GET_REGION_IO_FDS", REPLY, RegionIoFds(argsz=64, index=0, count=1),
               ShadowSubRegion(offset=8, size=4, fd_index=0, type=2, shadow_fd_index=0,
                               shadow_offset=0x100))
    tree = dissect(data, [{"kind": "eventfd"}])
    assert tree.values()["region_io_fds.sub.shadow_offset"] == [0x100]
    assert [e.id for e in tree.experts] == ["interop.io_fds_48"]


@pytest.mark.parametrize("name", CASES)
def test_malformed_variants_are_flagged_not_raised(name):
    data = CASES[name][0]
    variants = {
        "cut": [data[:n] for n in sorted({0, 4, 15, 16, 17, 20, len(data) - 1}) if n < len(data)],
        "extended": [data + b"\0" * 9],
        "wrong msg_size": [data[:4] + struct.pack("<I", len(data) + 3) + data[8:]],
        "bad type": [data[:8] + struct.pack("<I", 7) + data[12:]],
        "unknown command": [data[:2] + struct.pack("<H", 99) + data[4:]],
    }
    for kind, datas in variants.items():
        for variant in datas:
            tree = dissect(variant, CASES[name][1], CASES[name][2])
            assert tree.experts, (kind, variant.hex())


@pytest.mark.parametrize("bad,expert", [
    (msg("VERSION", REQ, Version(json=b'{"capabilities": {"max_msg_fds": 8}}')),
     "version.json_unterminated"),
    (msg("VERSION", REQ, Version(json=b"{not json\0")), "version.json_invalid"),
    (msg("VERSION", REQ, Version(json=caps_json({"max_msg_fds": "many"}))),
     "version.capability_type"),
    (msg("VERSION", REQ, Version(json=caps_json({"frobnicate": 1}))), "version.unknown_capability"),
    (msg("REGION_WRITE", REQ, RegionWrite(offset=0, region=0, count=8, data=b"1234")),
     "region_write.count"),
    (msg("DEVICE_SET_IRQS", REQ, SetIrqs(flags=0x06, index=2, count=1)), "set_irqs.flags"),
    (msg("REGION_WRITE_MULTI", REQ, WriteMulti(wr_cnt=3), WriteMultiEntry()), "write_multi.count"),
    (msg("DEVICE_GET_REGION_INFO", REPLY, RegionInfo(argsz=48, flags=0x8, index=1, cap_offset=32),
         RegionCap(id=1, next=0), SparseMmap(nr_areas=5)), "region_info.areas_short"),
    (msg("DEVICE_FEATURE", REQ, DeviceFeature(argsz=8, flags=(3 << 16) | 1)),
     "device_feature.get_and_set"),
    (msg("DEVICE_FEATURE", REQ, DeviceFeature(argsz=40, flags=(1 << 17) | 6),
         DmaLogging(num_ranges=4)), "dma_logging.ranges_short"),
    (msg("MIG_DATA_WRITE", REQ, MigDataWrite(size=10, data=b"abc")), "mig_data_write.size"),
    (msg("REGION_READ", 0x21), "header.errno_zero"),
])
def test_specific_problems_get_their_expert_id(bad, expert):
    assert expert in [e.id for e in dissect(bad).experts]


def test_first_value_of_a_field_a_member_a_bit_and_a_missing_one():
    data = msg("DMA_MAP", REQ, DmaMap(flags=3, address=0x1000, size=0x2000))
    tree = dissect(data)
    assert tree.first("dma_map.size") == 0x2000            # a member of a layer's row
    assert tree.first("dma_map.flags.write") is True       # a bit of a flags word
    assert tree.first("vfio_user.cmd") == CMD["DMA_MAP"]
    assert tree.first("dma_unmap.size") is None
