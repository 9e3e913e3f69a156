"""A non-Rust client for the node: Python grpcio calls cxrfed.v1.NodeService/Status over
mutual TLS with the certificates `cxrfed certs` issued (or without a client certificate).

Prints one JSON line: {"ok": true, "response_hex": ...} with the serialized StatusResponse,
or {"ok": false, "code": "UNAUTHENTICATED", "details": ...}.
"""

import argparse
import json

import grpc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key) if args.key else None,
        certificate_chain=read(args.cert) if args.cert else None,
    )
    with grpc.secure_channel(args.target, credentials) as channel:
        status = channel.unary_unary(
            "/cxrfed.v1.NodeService/Status",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            # StatusRequest has no fields: its encoding is empty.
            response = status(b"", timeout=20)
            print(json.dumps({"ok": True, "response_hex": response.hex()}))
        except grpc.RpcError as e:
            print(json.dumps({"ok": False, "code": e.code().name, "details": e.details()}))


if __name__ == "__main__":
    main()
