"""Event-driven reactors for the C-STORE SCP's associations (pynetdicom 3.0).

pynetdicom runs two polling loops per association: the DUL thread sleeps 1 ms whenever it finds
nothing to do, and the association thread sleeps 1 ms before every look at its queues. A C-STORE
goes through both once each way (the dataset's last PDU to the handler, the response to the
socket), so every instance waited ~1-1.5 ms on sleeps on a path of ~4.5 ms (the ingest bench:
212 instances/s against 248 with the sleeps cut to 50 us by hand).

Here the same loops wait on what they poll for instead: the DUL thread ``select``\\ s on the peer's
socket and a wake-up socket that every primitive queued to it writes to; the association thread
waits on an event that a complete DIMSE message or a primitive for it sets. What the loops still
check by time (ARTIM and idle timers, a kill, the other thread's end) they check every 20 ms, not
every 1 ms: those work in seconds, and an idle association now costs ~0.005 of a core instead of
~0.04 (measured: 4 idle associations 0.022 against 0.171 cores). The two ``run`` methods are
pynetdicom 3.0.4's own with the sleep replaced (the dependency is pinned to 3.0.x for that reason);
:func:`make_event_driven_server` serves a configured :class:`~pynetdicom.ae.ApplicationEntity` with them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
import time
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

logger = logging.getLogger("tessera.nodule.dicom")

LOOP_TIMEOUT_S = 0.02
"""Longest wait of either loop: how often timers (seconds), kills and the other thread's end are looked at."""


class _SignallingQueue(queue.Queue[Any]):
    """A queue that calls ``on_put`` after every item it takes (to wake the thread that reads it)."""

    def __init__(self, on_put: Any) -> None:
        super().__init__()
        self._on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL provider whose idle loop waits on the socket and on queued primitives."""

    def __init__(self, assoc: Association, on_user_primitive: Any) -> None:
        super().__init__(assoc)
        # A socket pair, not a pipe: once closed, a late wake-up fails on the object instead of
        # writing to whatever file reuses the descriptor number.
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.to_provider_queue = _SignallingQueue(self._wake)
        self.to_user_queue = _SignallingQueue(on_user_primitive)
        self._idle_socket_wakes = 0

    def _wake(self) -> None:
        # OSError: full (a wake-up is pending anyway) or closed (the loop has ended)
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def _wait_for_work(self, timeout: float) -> None:
        """Wait until the peer sends data, a primitive is queued, or ``timeout`` passes."""
        watched: list[Any] = [self._wake_reader]
        peer = self._peer_socket()
        if peer is not None and self._idle_socket_wakes == 0:
            watched.append(peer)
        elif peer is not None:
            # The socket woke the last wait but gave the loop nothing to do (e.g. a partial TLS
            # record): wait the plain period instead of spinning on it.
            self._idle_socket_wakes = 0
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):  # the peer socket closed meanwhile
            time.sleep(timeout)
            return
        if self._wake_reader in ready:
            self._drain_wake_ups()
        if peer is not None and peer in ready:
            self._idle_socket_wakes += 1

    def _peer_socket(self) -> socket.socket | None:
        transport = cast("AssociationSocket | None", self.socket)
        if transport is None or not transport._is_connected or transport.socket is None:
            return None
        return transport.socket if transport.socket.fileno() >= 0 else None

    def _drain_wake_ups(self) -> None:
        with contextlib.suppress(OSError):  # drained (BlockingIOError) or closed
            while self._wake_reader.recv(4096):
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``, waiting for work instead of sleeping."""
        try:
            self._run_reactor()
        finally:
            self._wake_reader.close()
            self._wake_writer.close()

    def _run_reactor(self) -> None:
        self._idle_timer.start()
        self.socket = cast("AssociationSocket", self.socket)
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait_for_work(LOOP_TIMEOUT_S)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                self._abort_on_error(exc)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self._idle_socket_wakes = 0
            self.state_machine.do_action(event)
            sleep = False

    def _abort_on_error(self, exc: Exception) -> None:
        """As pynetdicom does: bypass the state machine, send an A-ABORT and end both reactors."""
        logger.error("DICOM upper layer failed, aborting the association: %s", type(exc).__name__)
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        cast("AssociationSocket", self.socket).send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class EventDrivenAssociation(Association):
    """An acceptor association whose reactor wakes when a DIMSE message or a DUL primitive arrives."""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        super().__init__(ae, mode)
        self._work_ready = threading.Event()
        self.dul = EventDrivenDUL(self, self._work_ready.set)
        self.dimse.msg_queue = _SignallingQueue(self._work_ready.set)
        # Association.__init__ gave its timeouts to the DUL it made: give them to this one
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``Association._run_reactor``, waiting for work instead of sleeping."""
        self._is_paused = False
        while not self._kill:
            self._work_ready.wait(LOOP_TIMEOUT_S)
            self._work_ready.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self._peer_ended():
                return

    def _peer_ended(self) -> bool:
        """Release, abort, a dead DUL or the network timeout: handled as pynetdicom does; True when over."""
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            logger.error("DICOM network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return True
        return False


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, making :class:`EventDrivenAssociation` acceptors."""

    def _create_association(self) -> Association:
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        self._bind_handlers(assoc)
        return assoc

    def _bind_handlers(self, assoc: Association) -> None:
        for event, bound in self.server._handlers.items():
            if event.is_intervention and bound:
                assoc.bind(event, *bound)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast("list[tuple[Any, Any]]", bound):
                    assoc.bind(event, handler[0], handler[1])


def make_event_driven_server(ae: ApplicationEntity, address: tuple[str, int],
                             evt_handlers: list[Any]) -> ThreadedAssociationServer:
    """Start ``ae`` listening on ``address`` in a background thread, as ``AE.start_server(block=False)``
    does, with event-driven acceptor associations; ``shutdown()`` the returned server to stop it."""
    server = ae.make_server(address, evt_handlers=evt_handlers, server_class=ThreadedAssociationServer,
                            request_handler=EventDrivenRequestHandler)
    thread = threading.Thread(target=make_target(server.serve_forever),
                              name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server
