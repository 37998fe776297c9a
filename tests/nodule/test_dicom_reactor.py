"""The SCP's event-driven associations (services/nodule/dicom_reactor.py) against a real pynetdicom SCU
on loopback: they are what the server makes, they serve C-ECHO and C-STORE, end on the peer's release
and abort, still see the network timeout, and leave no threads or wake-up sockets behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from services.nodule import dicom_io
from services.nodule.dicom_reactor import EventDrivenAssociation, EventDrivenDUL, make_event_driven_server
from shared.config import get_settings
from tests.conftest import Stack
from tests.nodule.conftest import small_series
from tests.support import free_port

EXPLICIT = "1.2.840.10008.1.2.1"


def associate(port: int) -> Association:
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(CTImageStorage, EXPLICIT)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESSERA")
    assert assoc.is_established
    return assoc


def acceptor_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if isinstance(thread, (EventDrivenAssociation, EventDrivenDUL))]


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_scp_serves_with_event_driven_associations_and_they_end_on_release(scp: int) -> None:
    seen: list[type] = []
    assoc = associate(scp)
    assert int(assoc.send_c_echo().Status) == 0
    seen.extend(type(thread) for thread in acceptor_threads())
    datasets = small_series(slices=3)
    statuses = [int(assoc.send_c_store(dataset).Status) for dataset in datasets]
    assoc.release()
    assert statuses == [0, 0, 0]
    assert EventDrivenAssociation in seen and EventDrivenDUL in seen
    assert wait_until(lambda: not acceptor_threads()), "the acceptor's threads outlived the release"


def test_a_peer_abort_ends_the_association_and_the_server_keeps_serving(scp: int) -> None:
    assoc = associate(scp)
    assoc.abort()
    assert wait_until(lambda: not acceptor_threads()), "the acceptor's threads outlived the abort"
    again = associate(scp)
    assert int(again.send_c_echo().Status) == 0
    again.release()


def test_the_network_timeout_still_ends_an_idle_association(nodule_env: Stack) -> None:
    ended: list[str] = []
    ae = dicom_io.build_ae(get_settings())
    ae.network_timeout = 0.3
    handlers = [(evt.EVT_C_ECHO, dicom_io.handle_echo), (evt.EVT_ABORTED, lambda event: ended.append("aborted"))]
    server = make_event_driven_server(ae, ("127.0.0.1", free_port()), handlers)
    try:
        assoc = associate(int(server.server_address[1]))
        assert wait_until(lambda: bool(ended), 5.0), "the idle association was not ended by the network timeout"
        assert wait_until(lambda: not assoc.is_established)
    finally:
        server.shutdown()


def test_associations_leave_no_descriptors_behind(scp: int) -> None:
    def one() -> None:
        assoc = associate(scp)
        assoc.send_c_echo()
        assoc.release()

    one()
    assert wait_until(lambda: not acceptor_threads())
    before = open_descriptors()
    for _ in range(20):
        one()
    assert wait_until(lambda: not acceptor_threads())
    assert wait_until(lambda: open_descriptors() <= before + 2), f"{open_descriptors() - before} descriptors leaked"
