"""DICOM TLS (PS3.15 Annex B): the :class:`ssl.SSLContext` objects of the listener and of the
connection to the PACS, built from ``[listener] tls_*`` and ``[pacs] tls*``.

Every file problem (missing, unreadable, not PEM, a key that does not belong to its
certificate, an encrypted key) is a :class:`~cxr_worker.errors.StartupError` naming the key
and the path (exit 2), raised when the context is built, before anything listens or sends.

Decisions:

- **Listener: TLS only.** With ``listener.tls_certificate`` set, the listener's port speaks
  TLS and nothing else; a plain association is refused at the handshake (and logged). One
  port, one policy: a site that still has plain modalities runs them through a TLS proxy or
  keeps them on a separate, plain worker.
- **Client certificates are required by default** (``listener.tls_require_client_certificate
  = true``, which makes ``listener.tls_ca_certificates`` required): on a DICOM network TLS is
  mostly there to authenticate the nodes (AE titles authenticate nothing), as in IHE ATNA's
  node authentication. ``false``: any TLS client is accepted (the link is encrypted, nothing
  more); a certificate a client does present is still verified when a CA bundle is given.
- **TLS 1.2 minimum**, Python's default ciphers (forward secrecy, AEAD or SHA-2 MACs only,
  OpenSSL security level 2): BCP 195, the profile DICOM names for TLS.
- **The handshake runs on the association's thread, never the accepting one.** pynetdicom's
  server wraps each accepted socket in its accept loop, where a blocking handshake would let
  one client that connects and sends nothing stop the listener for every modality. The
  listener's context (:class:`ListenerContext`) defers the handshake to the
  ``EVT_CONN_OPEN`` handler (:func:`listener_handlers`), which runs it on the connection's
  own thread within ``listener.acse_timeout_seconds``; the socket then keeps
  ``listener.network_timeout_seconds``. A failed handshake is logged with the peer's address
  and OpenSSL's reason, and the connection closed.
- **PACS: its certificate is always verified**, against ``pacs.tls_ca_certificates`` or, when
  that is empty, the system's trusted CAs; there is no setting to skip verification. The
  certificate must name ``pacs.host`` (DNS name or IP address in subjectAltName) unless
  ``pacs.tls_verify_hostname = false``, for a PACS whose certificate does not name the
  address the worker uses (the chain is still verified).
- **Private keys are unencrypted PEM files**, readable by the worker's user only (``doctor``
  warns when others can read one): ``serve`` runs unattended, so there is no passphrase to
  type; an encrypted key is refused with a line saying how to decrypt it.
- ``cxr-worker echo --self`` and ``doctor`` reach a TLS listener with
  :func:`self_client_context`: the listener's own certificate pinned as the server's, and
  presented as the client certificate (which the listener accepts when its own CA bundle
  signs it and its extended key usage, if any, allows clientAuth).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pynetdicom import evt

from cxr_worker import send
from cxr_worker.errors import StartupError
from cxr_worker.settings import Listener, Pacs, Settings

logger = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class ListenerContext(ssl.SSLContext):
    """A server context whose sockets do not handshake where they are wrapped (pynetdicom's
    accept loop) but in :func:`handshake`, on the connection's thread.

    ``handshake_timeout`` bounds the handshake, ``network_timeout`` every later read.
    """

    handshake_timeout: float = 10.0
    network_timeout: float | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,  # type: ignore[override]
                    **kwargs: Any) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(self.handshake_timeout)
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, server_side=server_side, **kwargs)


def _refuse_passphrase(key: str, path: str) -> Callable[[], NoReturn]:
    def ask() -> NoReturn:
        raise StartupError(f"{key} {path}: the private key is encrypted, and the worker runs "
                           "unattended with no passphrase to give: store it decrypted "
                           "(openssl pkey -in KEY -out KEY.plain), readable by the worker's "
                           "user only (chmod 600)")

    return ask


def _check_file(key: str, path: str) -> str:
    p = Path(path).expanduser()
    try:
        with open(p, "rb"):
            pass
    except FileNotFoundError:
        raise StartupError(f"{key} {p}: no such file: set {key} to the PEM file") from None
    except IsADirectoryError:
        raise StartupError(f"{key} {p}: is a folder, not a PEM file: set {key} to the "
                           "file") from None
    except OSError as exc:
        raise StartupError(f"{key} {p}: cannot read it ({exc.strerror}): let the worker's "
                           "user read it") from None
    return str(p)


def _load_chain(ctx: ssl.SSLContext, section: str, cert: str, key: str) -> None:
    cert_key, key_key = f"{section}.tls_certificate", f"{section}.tls_private_key"
    cert_path, key_path = _check_file(cert_key, cert), _check_file(key_key, key)
    try:
        ctx.load_cert_chain(cert_path, key_path, password=_refuse_passphrase(key_key, key_path))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(f"{key_key} {key_path}: is not the private key of {cert_key} "
                               f"{cert_path}: set the two to a certificate and its own "
                               "key") from None
        raise StartupError(f"{cert_key} {cert_path} / {key_key} {key_path}: cannot load them "
                           f"({exc.reason or exc}): both must be PEM files, the certificate "
                           "first in its file, the key unencrypted") from None


def _load_cas(ctx: ssl.SSLContext, key: str, path: str) -> None:
    checked = _check_file(key, path)
    try:
        ctx.load_verify_locations(cafile=checked)
    except ssl.SSLError as exc:
        raise StartupError(f"{key} {checked}: no PEM certificate in it ({exc.reason or exc}): "
                           "set it to a file of one or more PEM CA certificates") from None


def server_context(li: Listener) -> ListenerContext | None:
    """The listener's context, or None when ``listener.tls_certificate`` is empty."""
    if not li.tls_certificate:
        return None
    ctx = ListenerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.handshake_timeout = li.acse_timeout_seconds
    ctx.network_timeout = li.network_timeout_seconds
    _load_chain(ctx, "listener", li.tls_certificate, li.tls_private_key)
    if li.tls_ca_certificates:
        _load_cas(ctx, "listener.tls_ca_certificates", li.tls_ca_certificates)
        ctx.verify_mode = (ssl.CERT_REQUIRED if li.tls_require_client_certificate
                           else ssl.CERT_OPTIONAL)
    return ctx


def client_context(p: Pacs) -> ssl.SSLContext | None:
    """The context for associations with the PACS, or None when ``pacs.tls`` is false."""
    if not p.tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, hostname checked
    ctx.minimum_version = MINIMUM_VERSION
    ctx.check_hostname = p.tls_verify_hostname
    if p.tls_ca_certificates:
        _load_cas(ctx, "pacs.tls_ca_certificates", p.tls_ca_certificates)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if p.tls_certificate:
        _load_chain(ctx, "pacs", p.tls_certificate, p.tls_private_key)
    return ctx


def self_client_context(li: Listener) -> ssl.SSLContext | None:
    """A context to reach this worker's own TLS listener (``echo --self``, ``doctor``): its
    certificate pinned (no CA or hostname needed), and presented as the client's."""
    if not li.tls_certificate:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.check_hostname = False  # listener.host may be 0.0.0.0; the certificate is pinned
    _load_cas(ctx, "listener.tls_certificate", li.tls_certificate)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # trust the pinned leaf itself
    _load_chain(ctx, "listener", li.tls_certificate, li.tls_private_key)
    return ctx


def pacs_peer(s: Settings) -> send.Peer | None:
    """The PACS as :mod:`cxr_worker.send` reaches it (over TLS with ``pacs.tls``); None when
    none is configured. A TLS file that cannot be used raises :class:`StartupError`."""
    if not s.pacs_configured:
        return None
    return send.Peer(s.pacs.ae_title, s.pacs.host, s.pacs.port, s.listener.ae_title,
                     s.pacs.timeout_seconds, ssl_context=client_context(s.pacs),
                     connect_timeout_seconds=s.pacs.connect_timeout_seconds,
                     idle_release_seconds=s.pacs.idle_release_seconds)


def self_peer(s: Settings, calling_ae_title: str, timeout_seconds: float) -> send.Peer:
    """This worker's own listener, as ``echo --self`` and ``doctor`` reach it (over TLS with
    :func:`self_client_context` when the listener speaks TLS)."""
    return send.Peer(s.listener.ae_title, s.listener.host, s.listener.port, calling_ae_title,
                     timeout_seconds, ssl_context=self_client_context(s.listener))


def readable_by_others(path: str) -> bool:
    """Whether users other than the owner and group can read ``path`` (a private key)."""
    try:
        return bool(os.stat(Path(path).expanduser()).st_mode & stat.S_IROTH)
    except OSError:
        return False


# what OpenSSL's reasons for a refused handshake mean for whoever reads the listener's log
_HINTS = {
    "WRONG_VERSION_NUMBER": "not TLS: a plain DICOM client?",
    "HTTP_REQUEST": "not TLS: an HTTP client",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client presented no certificate",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions below 1.2",
    "NO_SHARED_CIPHER": "no cipher in common with the client",
}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"client certificate not accepted ({exc.verify_message}; "
                "listener.tls_ca_certificates must hold its CA)")
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc.strerror or exc)
        return f"{reason} ({_HINTS[reason]})" if reason in _HINTS else reason
    if isinstance(exc, TimeoutError):
        return "no handshake within the timeout"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def handshake(event: Any) -> None:
    """``EVT_CONN_OPEN`` of the TLS listener: run the deferred handshake on this thread.

    On failure the socket is closed, so that the association ends at once (pynetdicom sees
    a closed transport) and no A-ASSOCIATE-RQ is ever read from the peer.
    """
    sock = event.assoc.dul.socket.socket
    if not isinstance(sock, ssl.SSLSocket):
        return
    host, port = event.address[:2]
    try:
        sock.do_handshake()
    except OSError as exc:  # ssl.SSLError, a timeout, a reset
        logger.warning("TLS handshake from %s:%d refused: %s; connection closed", host, port,
                       _reason(exc))
        sock.close()
        return
    ctx = sock.context
    sock.settimeout(ctx.network_timeout if isinstance(ctx, ListenerContext) else None)
    cert: dict[str, Any] = dict(sock.getpeercert() or {})
    names = [rdn[0] for rdn in cert.get("subject", ())]
    cn = next((str(v) for k, v in names if k == "commonName"), None)
    logger.debug("TLS from %s:%d: %s, client certificate %s", host, port, sock.version(),
                 "none" if not names else f"CN={cn}")


def listener_handlers(ctx: ssl.SSLContext | None) -> list[Any]:
    """The event handlers a TLS listener needs (none for plain DICOM)."""
    return [(evt.EVT_CONN_OPEN, handshake)] if ctx is not None else []
