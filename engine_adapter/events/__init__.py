"""vLLM KV-cache events: wire decoding (`decoder`), ZMQ subscription (`subscriber`), and
the engine-agnostic domain events the gateway consumes (`model`)."""
