#!/usr/bin/env python3
"""Call FetchX509SVID on a SPIFFE Workload API WITHOUT the `workload.spiffe.io` header.

Usage: missing_header.py SOCKET_PATH

A raw grpcio call (no py-spiffe interceptor). Prints one JSON object: code (the gRPC
status name, or "OK" if a response arrived) and details.
"""

import json
import sys

import grpc


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with grpc.insecure_channel(f"unix:{sys.argv[1]}") as channel:
        # X509SVIDRequest is an empty message: its encoding is empty.
        call = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=lambda _: b"",
            response_deserializer=lambda raw: raw,
        )
        try:
            stream = call(None, timeout=10)
            next(stream)
            stream.cancel()
            result = {"code": "OK", "details": ""}
        except grpc.RpcError as err:
            result = {"code": err.code().name, "details": err.details()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
