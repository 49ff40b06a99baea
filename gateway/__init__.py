"""Prefix-aware, OpenAI-compatible routing gateway for fleets of vLLM engines."""

__version__ = "0.1.0"
