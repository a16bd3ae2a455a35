#!/usr/bin/env bash
# Regenerate rayx/protocol/rayx_pb2*.py from rayx/protocol/rayx.proto (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. rayx/protocol/rayx.proto
