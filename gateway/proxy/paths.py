"""The engine API paths the gateway proxies beyond chat, completions and embeddings.

Nothing here imports the rest of the gateway, so any module (the tokenizers included) can
name these paths without an import cycle.
"""

from __future__ import annotations

# OpenAI Responses API: proxied like chat completions (prefix-routed when the tokenizers
# handle it), plus affinity for `previous_response_id` (gateway.proxy.response_affinity).
RESPONSES_PATH = "/v1/responses"
# Stored responses live in one engine's memory: these go to the engine that produced the id.
# The templates are also the metric labels (never the raw path, which holds the id).
RESPONSE_ROUTE = "/v1/responses/{response_id}"
RESPONSE_CANCEL_ROUTE = "/v1/responses/{response_id}/cancel"

# vLLM 0.32's model-scoped POST endpoints with JSON bodies, passed through as they are:
# routed by model and load, never tokenized for prefix routing, retried like the others.
# Left out on purpose: /v1/audio/* (multipart bodies), the scale-out plumbing
# (/v1/*/render, /inference/v1/generate, /derender: the gateway's own tokenization uses
# render), /invocations (SageMaker), and per-engine admin/dev/RL endpoints (LoRA loading,
# sleep, profiling, weight updates): those address one engine, not a model.
PASSTHROUGH_PATHS: tuple[str, ...] = (
    # Anthropic Messages API
    "/v1/messages",
    "/v1/messages/count_tokens",
    # tokenizer of the model (`model` may be absent: see gateway.api.openai)
    "/tokenize",
    "/detokenize",
    # pooling models
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/v2/embed",  # Cohere-style embed
    # generative models, beyond the prefix-routed APIs
    "/v1/chat/completions/batch",
    "/generative_scoring",
    "/v1/systemone",  # structured decisions
    "/cohere/v2/chat",  # served when the engine has VLLM_ENABLE_COHERE_API=1
)
