"""A minimal durable pynetdicom Storage SCP: the peer that shows what pynetdicom itself costs.

Same presentation contexts as the worker's listener (Verification; CR, DX For Presentation and
Secondary Capture with every transfer syntax the worker can decode) and the same maximum PDU
(1 MiB); each C-STORE's data set is written as received (``event.encoded_dataset()``, the
File Meta Information in front, nothing decoded) to ``DIR/<SOP Instance UID>.dcm``, fsync'd,
and answered 0x0000. Binds 127.0.0.1 only. Run by bench/peers.py as a subprocess:

    python bench/minimal_scp.py --port PORT --dir DIR [--aet MINSCP]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxr_worker.receive import ACCEPTED_STORAGE, MAX_PDU_SIZE, transfer_syntaxes


def make_ae(aet: str) -> AE:
    ae = AE(aet)
    ae.maximum_pdu_size = MAX_PDU_SIZE
    ae.maximum_associations = 64
    ae.add_supported_context(Verification)
    syntaxes = transfer_syntaxes()
    for sop_class in ACCEPTED_STORAGE:
        ae.add_supported_context(sop_class, syntaxes)
    return ae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--aet", default="MINSCP")
    args = ap.parse_args()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)

    def handle_store(event: Any) -> int:
        data = event.encoded_dataset()
        path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0x0000

    ae = make_ae(args.aet)
    server = ae.start_server(("127.0.0.1", args.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("minimal-scp ready", flush=True)
    stop.wait()
    if server is not None:
        server.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
