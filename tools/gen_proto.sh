#!/usr/bin/env bash
# Regenerate the committed Python stubs (specray/v1/specray_pb2*.py, .pyi) from proto/.
# tests/unit/test_proto_current.py fails when they are out of date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/specray/v1/specray.proto
