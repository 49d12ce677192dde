"""The Python floor: an Envoy ext_authz service that answers OK at once.

Over gRPC (``--grpc``) it runs the same grpcio ``grpc.aio`` server and generated stubs as
``mcp-authz`` but does no parsing, policy or store work, so the benchmark's configuration 2
measures only what any Python ext_authz pays (HTTP/2, protobuf decode of the CheckRequest
with its body, the event loop). Over Envoy's HTTP mode (``--authz-http``) it runs
``mcp-authz``'s own HTTP protocol (authz/authz_http.py) on uvloop, with a decision that
allows at once: configuration 7, the floor of that transport. ``mcp-authz`` is judged
against these floors, not against an ideal of zero.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop
from google.rpc import status_pb2

from authz import authz_http, reply
from authz.mcp import HttpRequest
from authz.pb import external_auth_pb2, external_auth_pb2_grpc

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))
_ALLOW = reply.Reply(allowed=True, status=200, reason="allowed")


async def _allow(_: HttpRequest) -> reply.Reply:
    return _ALLOW


class AllowEverything(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return _OK


async def serve(address: str) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AllowEverything(), server)
    server.add_insecure_port(address)
    await server.start()
    await _stopped()
    await server.stop(grace=1.0)


async def serve_http(address: str) -> None:
    listener = authz_http.Listener(_allow)
    host, _, port = address.rpartition(":")
    await listener.start(host, int(port), reuse_port=False)
    await _stopped()
    await listener.stop(1.0)


async def _stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", default="127.0.0.1:9001", help="gRPC HOST:PORT")
    parser.add_argument("--authz-http", help="serve Envoy's HTTP ext_authz mode instead")
    args = parser.parse_args()
    if args.authz_http:
        uvloop.run(serve_http(args.authz_http))
    else:
        asyncio.run(serve(args.grpc))


if __name__ == "__main__":
    main()
