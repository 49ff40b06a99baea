"""Everything that knows vLLM: KV-event decoding, metrics scraping, KV transfer, engine launching.

This package never imports `gateway`; the gateway stays engine-agnostic.
"""
