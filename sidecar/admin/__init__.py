"""The control plane's admin gRPC API (grpc.aio): translates in, calls the core, translates out."""
