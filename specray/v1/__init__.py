"""Generated gRPC/protobuf stubs for proto/specray/v1 (tools/gen_proto.sh); imported only by specray/deployments."""
