"""The SOP classes the worker takes in and puts out, named once.

In: the radiographs the listener accepts (:func:`cxr_worker.receive.storage_classes`) are the
ones the gate lets through (:func:`cxr_worker.gate.check`, rule ``sop_class``):
:data:`ACCEPTED`, and :data:`OPTIONAL` only with the setting it names. Out: the result
objects (:mod:`cxr_worker.report`, :mod:`cxr_worker.report_sr`). Imports nothing of the
package: every stage may use it.
"""

from __future__ import annotations

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"

ACCEPTED = (CR, DX_PRESENTATION, SECONDARY_CAPTURE)
"""Always accepted and scored (a Secondary Capture converted from a radiograph too)."""
OPTIONAL: dict[str, str] = {DX_PROCESSING: "listener.accept_dx_for_processing"}
"""Accepted only when the setting named is true: raw detector data."""


def accepted(accept_dx_for_processing: bool) -> tuple[str, ...]:
    """The classes received and scored with these settings."""
    enabled = {"listener.accept_dx_for_processing": accept_dx_for_processing}
    return ACCEPTED + tuple(c for c, setting in OPTIONAL.items() if enabled[setting])
