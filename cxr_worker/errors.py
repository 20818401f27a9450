"""The worker's exceptions, one tree.

    CxrWorkerError
    ├── ConfigError            invalid settings; start-up stops with the key named
    ├── StartupError           a valid setting or argument names something unusable: a data_dir
    │                          that cannot be written, a port in use, a database that cannot
    │                          be reached, a model folder that is not one, a missing input;
    │                          the message names the key (or argument) and what to do
    ├── ModelIntegrityError    model file missing, or its sha256 differs from the model card
    ├── CalibrationError       a site's labelled images cannot give a threshold (too few, bad list)
    ├── NotScoredError         an image that is kept but not scored; ``reason`` is recorded
    │   ├── OutOfScopeError    the gate refused it (``rule`` names the rule)
    │   ├── DecodeError        its pixels cannot be turned into model input
    │   │   ├── UnsupportedTransferSyntaxError
    │   │   └── LimitExceededError larger than a ``[limits]`` setting allows (``setting``)
    │   └── QuarantinedError   not scored, and the file moved to the quarantine folder
    ├── SpoolError             the spool could not store a dataset durably
    ├── UIDConflictError       a SOP Instance UID already held for another study or patient
    └── SendError              the PACS refused or could not be reached (retried later)

Every error that reaches the worklist or a CLI's JSON carries a short, patient-free reason.
``cxr-worker`` prints any of them as one line on stderr: ``ConfigError`` and ``StartupError``
exit 2, the others 1 (the traceback only with ``--log-level DEBUG``).
"""

from __future__ import annotations

from pathlib import Path


class CxrWorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class ConfigError(CxrWorkerError):
    """A setting is missing or invalid; the message names the key."""


class StartupError(CxrWorkerError):
    """A command cannot start: what a setting or argument names cannot be used.

    The message names the key (``storage.data_dir``, ``listener.port``, ``database.url``,
    ``model.path``) or the argument, the value (passwords masked) and what to do.

    ``transient``: the setting may be right and the peer not there yet (a database server
    that does not answer): exit 1, so that systemd restarts the worker
    (``RestartPreventExitStatus=2`` stops it only for errors a restart cannot fix).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ModelIntegrityError(CxrWorkerError):
    """The model or its card cannot be trusted."""


class CalibrationError(CxrWorkerError):
    """``calibrate``: the labelled data cannot give a threshold; the message says what to add."""


class NotScoredError(CxrWorkerError):
    """An image the worker keeps but does not score. ``reason`` is what the worklist shows."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OutOfScopeError(NotScoredError):
    """The input gate refused the image; ``rule`` is the rule's name (e.g. ``view_position``).

    ``population`` is set when the refusal is about it (rule ``patient_age``): ``outside``
    or ``unknown``, recorded in the worklist like a scored image's.
    """

    def __init__(self, rule: str, detail: str, population: str | None = None) -> None:
        super().__init__(f"out of scope ({rule}): {detail}")
        self.rule = rule
        self.population = population


class DecodeError(NotScoredError):
    """The pixel data cannot be decoded to the model input."""


class UnsupportedTransferSyntaxError(DecodeError):
    """No installed decoder handles the transfer syntax."""


class LimitExceededError(DecodeError):
    """The image is larger than a ``[limits]`` setting allows: its data set, its declared
    decoded size or its inflated size. ``setting`` names the key (``limits.max_decoded_bytes``);
    the reason quotes only sizes and the limit, never a value of the header's text.

    The listener answers it with a DICOM status (nothing written); the pipeline quarantines
    the file (it is a DecodeError) with the reason.
    """

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(reason)
        self.setting = setting


class QuarantinedError(NotScoredError):
    """Not scored, and the file was moved to ``path`` in the quarantine folder."""

    def __init__(self, reason: str, path: Path) -> None:
        super().__init__(reason)
        self.path = path


class SpoolError(CxrWorkerError):
    """A received dataset could not be stored durably."""


class UIDConflictError(CxrWorkerError):
    """A received SOP Instance UID is held for another study or patient; the row is kept.

    The message names UIDs only (never the Patient ID, which is compared as a hash).
    """


class SendError(CxrWorkerError):
    """A C-STORE to the PACS failed; ``status`` is the DICOM status when one came back."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
