"""libvfio-user's own pytest suite (test/py), its client and in-process server
talking through `vfu-inspect proxy` (tests/libvfio_user_suite_plugin.py).

The suite probes the server's error paths: every request the server refuses
must carry an expert item saying why, unless the refusal is one the wire
cannot show (listed in NOT_ON_THE_WIRE, each with its reason).  The expert
ids raised are listed per test module (`pytest -s` shows them).
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

import pytest

from helpers import LIBVFIO_USER, TESTS, needs_libvfio_user
from vfu_inspect.capture import read_all
from vfu_inspect.dissect import Analyzer, find_responses
from vfu_inspect.packet import Dissected

pytestmark = needs_libvfio_user

# What fails only through a relay: the test closes its client socket inside a
# server callback and expects the server's reply to fail, which the proxy,
# still connected, takes instead.
RELAY_ONLY_FAILURES = {"test_request_errors.py::test_reply_fail_quiesce_busy"}

_NEVER_QUERIED = "the client never asked (GET_INFO, GET_IRQ_INFO) what the server refuses it by"
_SERVER_CALLBACK = "a server callback the test makes fail"
_UNSTATED_LIMIT = "a server limit not stated in its VERSION reply"
_DEVICE = "the device's config space semantics (read-only registers), not the protocol's"
# Refused requests the capture cannot flag, by (test, command): why.
NOT_ON_THE_WIRE = {
    ("test_device_get_irq_info.py::test_device_get_irq_info_bad_in", "DEVICE_GET_IRQ_INFO"): _NEVER_QUERIED,
    ("test_device_get_region_info.py::test_device_get_region_info_bad_index",
     "DEVICE_GET_REGION_INFO"): _NEVER_QUERIED + "; regions past 8 may exist (device-specific)",
    ("test_device_get_region_io_fds.py::test_device_get_region_io_fds_no_regions_setup",
     "DEVICE_GET_REGION_IO_FDS"): "BAR3 has no io fds: the server's own configuration",
    ("test_device_get_region_io_fds.py::test_device_get_region_io_fds_region_out_of_range",
     "DEVICE_GET_REGION_IO_FDS"): _NEVER_QUERIED,
    **{(f"test_device_set_irqs.py::test_device_set_irqs_{name}", "DEVICE_SET_IRQS"): _NEVER_QUERIED
       for name in ("bad_index", "bad_start_count_range", "bad_start_count_range2",
                    "bad_action_for_err_irq", "bad_action_for_req_irq",
                    "bad_start_count_range_for_err_irq", "bad_start_count_range_for_req_irq")},
    ("test_dirty_pages.py::test_dirty_pages_start_different_pgsize", "DEVICE_FEATURE"):
        "valid: the spec has the device pick another page size; libvfio-user refuses instead",
    ("test_dirty_pages.py::test_dirty_pages_uninitialised_dma", "DEVICE_FEATURE"):
        "the server set up no DMA controller",
    ("test_dma_map.py::test_dma_region_too_big", "DMA_MAP"): _UNSTATED_LIMIT,
    ("test_dma_map.py::test_dma_region_too_many", "DMA_MAP"):
        _UNSTATED_LIMIT + " (it states no max_dma_maps, so 65535 holds)",
    ("test_migration.py::test_migration_failed_callback", "DEVICE_FEATURE"): _SERVER_CALLBACK,
    ("test_migration.py::test_handle_mig_data_read_failed_callback", "MIG_DATA_READ"): _SERVER_CALLBACK,
    ("test_migration.py::test_handle_mig_data_write_failed_callback", "MIG_DATA_WRITE"): _SERVER_CALLBACK,
    ("test_quiesce.py::test_device_quiesce_error", "DMA_MAP"): _SERVER_CALLBACK,
    ("test_migration.py::test_handle_mig_data_read_too_long", "MIG_DATA_READ"):
        "valid: the size is within the server's max_data_xfer_size (the spec's limit, "
        "that of the peer); libvfio-user applies the client's",
    ("test_migration.py::test_handle_mig_data_write_too_long", "MIG_DATA_WRITE"):
        "valid: as for MIG_DATA_READ, libvfio-user applies the client's max_data_xfer_size",
    ("test_negotiate.py::test_invalid_major", "VERSION"):
        "valid: a client may propose any major; the server that cannot support it closes",
    ("test_negotiate.py::test_invalid_json_bad_max_fds3", "VERSION"):
        "valid: the spec bounds no max_msg_fds; libvfio-user refuses more than 1024",
    ("test_negotiate.py::test_invalid_json_bad_pgsize2", "VERSION"):
        "migration is not a spec capability; libvfio-user wants a 4 KiB multiple",
    ("test_pci_caps.py::test_add_caps", "REGION_WRITE"): _DEVICE,
    ("test_pci_caps.py::test_pci_cap_write_msi", "REGION_WRITE"): _DEVICE,
    ("test_pci_ext_caps.py::test_pci_ext_cap_write_hdr", "REGION_WRITE"): _DEVICE,
    ("test_pci_ext_caps.py::test_pci_ext_cap_readonly", "REGION_WRITE"): _DEVICE,
    ("test_pci_ext_caps.py::test_pci_ext_cap_write_dsn", "REGION_WRITE"): _DEVICE,
    ("test_sgl_read_write.py::test_dma_read_write_error[0]", "DMA_READ"):
        "the test's client fails the server's DMA_READ on purpose",
}


def suite_dir() -> Path:
    return Path(os.environ.get("LIBVFIO_USER_SRC", Path(LIBVFIO_USER).parent / "src")) / "test" / "py"


def run_suite(out: Path, proxied: bool) -> set[str]:
    """The suite's failed tests (node ids); with `proxied`, through the proxy."""
    out.mkdir()
    report = out / "report.xml"
    env = {**os.environ, "LIBVFIO_SO_DIR": str(Path(LIBVFIO_USER) / "lib"),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(TESTS), "VFU_SUITE_DIR": str(out)}
    plugin = ["-p", "libvfio_user_suite_plugin"] if proxied else []
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin,
                    f"--junitxml={report}"], cwd=suite_dir(), env=env, capture_output=True,
                   timeout=600)
    return {f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
            for case in ElementTree.parse(report).iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[set[str], set[str], list[tuple[str, Dissected]]]:
    """Failures directly and through the proxy, and each captured message
    with the test that sent it."""
    base = tmp_path_factory.mktemp("lvu-suite")
    direct = run_suite(base / "direct", proxied=False)
    proxied = run_suite(base / "proxied", proxied=True)
    records, damage = read_all(base / "proxied" / "suite.vfucap")
    assert damage is None
    tests = json.loads((base / "proxied" / "tests.json").read_text())
    starts = [start for _, start in tests]
    packets = list(Analyzer(find_responses(records)).run(records))
    return direct, proxied, [(tests[bisect.bisect_right(starts, p.msg.ts_ns) - 1][0], p)
                             for p in packets]


def test_the_suite_passes_through_the_proxy_as_it_does_directly(suite):
    direct, proxied, messages = suite
    assert proxied - direct == RELAY_ONLY_FAILURES
    assert len({test for test, _ in messages}) > 150        # nearly every test talked


def test_expert_ids_per_test_module(suite):
    _, _, messages = suite
    per_module: dict[str, Counter] = {}
    for test, p in messages:
        per_module.setdefault(test.split("::")[0], Counter()).update(e.id for e in p.tree.experts)
    for module, ids in sorted(per_module.items()):
        print(f"{module}: " + ", ".join(f"{i} x{n}" for i, n in sorted(ids.items())))
    raised = sum(per_module.values(), Counter())
    assert not raised.keys() & {"dissector.bug", "capture.truncated"}
    assert raised["reply.unmatched"] == 2           # test_unsolicited_reply's reply, and its answer


def test_every_refused_request_is_flagged_or_explained(suite):
    _, _, messages = suite
    by_number = {p.number: (test, p) for test, p in messages}
    refused = [by_number[p.request_in] for _, p in messages
               if p.header is not None and p.header.is_error and p.request_in is not None]
    unflagged = {(test, request.header.command_name) for test, request in refused
                 if not request.tree.experts}
    flagged = sum(bool(request.tree.experts) for _, request in refused)
    print(f"{flagged} of {len(refused)} refused requests flagged; the "
          f"{len(refused) - flagged} others cannot be told from the wire:")
    for key in sorted(unflagged):
        print(f"  {key[0]} {key[1]}: {NOT_ON_THE_WIRE.get(key, 'NOT EXPLAINED')}")
    assert unflagged == set(NOT_ON_THE_WIRE)
