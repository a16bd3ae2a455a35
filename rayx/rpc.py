"""gRPC plumbing: servers that demand the cluster token, and channels that present it."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc

from rayx.protocol import rayx_pb2_grpc

TOKEN_KEY = "rayx-token"
log = logging.getLogger(__name__)

_OPTIONS = [
    ("grpc.max_send_message_length", 512 * 1024 * 1024),
    ("grpc.max_receive_message_length", 512 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


class _TokenCheck(grpc.ServerInterceptor):
    """Refuse (and log) every call that does not carry the cluster token."""

    def __init__(self, token: str):
        self.token = token

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "rayx: missing or wrong cluster token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_KEY and value == self.token:
                return continuation(details)
        log.warning("refused %s: missing or wrong cluster token", details.method)
        return self._deny


def make_server(token: str, bind: str, max_workers: int = 128,
                tls: tuple[bytes, bytes, bytes | None] | None = None) -> tuple[grpc.Server, int]:
    """A gRPC server bound to `bind` ("host:port", port 0 picks one); returns (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="rayx-rpc"),
                         interceptors=[_TokenCheck(token)], options=_OPTIONS)
    if tls is not None:
        cert, key, ca = tls
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                            require_client_auth=ca is not None)
        port = server.add_secure_port(bind, creds)
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"could not bind the gRPC server to {bind}")
    return server, port


class _AddToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.meta = ((TOKEN_KEY, token),)

    def _details(self, d):
        return d._replace(metadata=tuple(d.metadata or ()) + self.meta)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def server_tls(settings) -> tuple[bytes, bytes, bytes | None] | None:
    """(cert, key, ca) for a server when settings name a certificate; ca demands client certs."""
    if not settings.tls_cert:
        return None
    return _read(settings.tls_cert), _read(settings.tls_key), _read(settings.tls_ca)


def client_tls(settings) -> tuple[bytes | None, bytes | None, bytes | None] | None:
    """(cert, key, ca) for channels when settings ask for TLS (a CA to trust, at least)."""
    if not (settings.tls_ca or settings.tls_cert):
        return None
    return _read(settings.tls_cert), _read(settings.tls_key), _read(settings.tls_ca)


def channel(address: str, token: str, tls: tuple[bytes | None, bytes | None, bytes | None]
            | None = None) -> grpc.Channel:
    """A channel to `address` ("host:port") whose every call carries `token`."""
    if tls is not None:
        cert, key, ca = tls
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                             certificate_chain=cert)
        ch = grpc.secure_channel(address, creds, options=_OPTIONS)
    else:
        ch = grpc.insecure_channel(address, options=_OPTIONS)
    return grpc.intercept_channel(ch, _AddToken(token))


def head_stub(ch: grpc.Channel) -> rayx_pb2_grpc.HeadStub:
    return rayx_pb2_grpc.HeadStub(ch)


def node_stub(ch: grpc.Channel) -> rayx_pb2_grpc.NodeManagerStub:
    return rayx_pb2_grpc.NodeManagerStub(ch)


_in_flight: set = set()
_in_flight_lock = threading.Lock()


def call_async(method, request, timeout: float | None = None, callback=None):
    """Start a call without waiting for it. gRPC cancels a call whose future is garbage
    collected, so the future is kept here until it completes."""
    fut = method.future(request, timeout=timeout)
    with _in_flight_lock:
        _in_flight.add(fut)

    def done(f):
        with _in_flight_lock:
            _in_flight.discard(f)
        if callback is not None:
            callback(f)

    fut.add_done_callback(done)
    return fut
