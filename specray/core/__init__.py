"""Pure-torch core: model runtime, KV cache, token trees, sampling, verification, reference generate().

This package knows nothing of Ray, Serve or gRPC (a test enforces it)."""
