"""The Python floor: an Envoy ext_authz gRPC service that answers OK at once.

It runs the same grpcio ``grpc.aio`` server and generated stubs as ``mcp-authz`` but does
no parsing, policy or store work, so the benchmark's configuration 2 measures only what any
Python ext_authz pays (HTTP/2, protobuf decode of the CheckRequest with its body, the event
loop). ``mcp-authz`` is judged against this floor, not against an ideal of zero.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
from google.rpc import status_pb2

from authz.pb import external_auth_pb2, external_auth_pb2_grpc

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", default="127.0.0.1:9001", help="gRPC HOST:PORT")
    asyncio.run(serve(parser.parse_args().grpc))


if __name__ == "__main__":
    main()
