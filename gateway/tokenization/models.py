"""Which tokenizer each model gets, and the proof that it gives the engine's token ids.

Per model (`models[].tokenizer`):
  - a local directory or a Hugging Face model id: loaded once, in a worker thread;
  - `auto` (the default): the model's own files where the gateway can read them (the `root`
    that the engine's `/v1/models` reports: a directory on this host, or a model id already in
    the local Hugging Face cache; nothing is downloaded), else the engines' own tokenization;
  - `engine`: always ask the engines (`/render` where enabled, else `/tokenize`).

Before a local tokenizer is used, and again whenever an engine serving the model (re)joins,
its token ids for a few probe prompts are compared with that engine's `/tokenize`. A local
tokenizer that disagrees, or cannot be loaded, is not used: the engines tokenize instead,
and the model is reported degraded with the reason. A model that cannot be tokenized at all
is reported too. Prefix routing never silently degrades to load-only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.tasks import cancel_and_wait
from gateway.tokenization.engine import EngineTokenizer
from gateway.tokenization.prompt import ChatPrompt, TextPrompt
from gateway.tokenization.tokenizer import HFPromptTokenizer, PromptTokenizer, TokenizationFailed

logger = logging.getLogger(__name__)

AUTO = "auto"
ENGINE = "engine"

# Prompts whose token ids must be equal, locally and on the engine: a multi-turn chat with a
# system prompt (the template's joins between messages) and plain text with special spacing.
PROBES: tuple[ChatPrompt | TextPrompt, ...] = (
    ChatPrompt(messages=[
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Hello! What is 2 + 2?"},
        {"role": "assistant", "content": "4.\n\nAnything else?"},
        {"role": "user", "content": "Ünïcödé, 漢字 and emoji 🚀, tabs\tand  spaces."},
    ]),  # fmt: skip
    TextPrompt(" The quick brown fox\n\tjumps over 13 lazy dogs. "),
)


@dataclass(frozen=True, slots=True)
class TokenizerStatus:
    source: str  # "local <path or id>" or "engine"
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


class ModelTokenizers:
    def __init__(
        self,
        settings: Mapping[str, str],
        engine: EngineTokenizer,
        registry: EndpointRegistry,
        *,
        executor: Executor | None = None,
        offload_min_chars: int = 2048,
        head_chars: int = 1024,
        on_status: Callable[[str, TokenizerStatus], None] | None = None,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        """`on_loaded`: called after each local tokenizer is loaded (the server freezes what
        exists then, gateway.app.freeze_long_lived: a tokenizer loaded after start-up, for an
        engine that joined later, brings as many objects as one loaded before)."""
        self._settings = dict(settings)
        self._engine = engine
        self._registry = registry
        self._executor = executor
        self._offload_min_chars = offload_min_chars
        self._head_chars = head_chars
        self._on_status = on_status
        self._on_loaded = on_loaded
        self._loaded: dict[str, HFPromptTokenizer] = {}  # by source: one load each
        self._use_local: dict[str, HFPromptTokenizer] = {}  # by model, once verified
        self.status: dict[str, TokenizerStatus] = {}
        self._checks: dict[str, asyncio.Task[TokenizerStatus]] = {}
        self._closed = False

    def for_model(self, model: str) -> PromptTokenizer:
        """The tokenizer to use now. A model never checked gets its check started; until it
        is done, the engines tokenize for it (correct, one extra hop)."""
        local = self._use_local.get(model)
        if local is not None:
            return local
        if model not in self.status:
            self.schedule_check(model)
        return self._engine

    def problems(self) -> dict[str, str]:
        return {m: s.problem for m, s in sorted(self.status.items()) if s.problem is not None}

    def schedule_check(self, model: str) -> asyncio.Task[TokenizerStatus] | None:
        running = self._checks.get(model)
        if self._closed or (running is not None and not running.done()):
            return running
        task = asyncio.get_running_loop().create_task(self.check(model), name=f"tokenizer-check-{model}")
        self._checks[model] = task
        return task

    def reconfigure(self, settings: Mapping[str, str], registry: EndpointRegistry) -> None:
        """A reload: these engines, and these `models[].tokenizer` settings. A model whose
        setting changed is checked again; until the check proves its tokenizer, the engines
        tokenize for it (correct, one extra hop)."""
        self._registry = registry
        changed = {m for m in {*self._settings, *settings} if self._settings.get(m, AUTO) != settings.get(m, AUTO)}
        self._settings = dict(settings)
        for model in sorted(changed):
            running = self._checks.pop(model, None)
            if running is not None:
                running.cancel()  # it checks the old setting
            self._use_local.pop(model, None)
            self.schedule_check(model)

    def engine_joined(self, endpoint: Endpoint) -> None:
        """An engine (re)joined, maybe restarted with another tokenizer or flags: check again."""
        self._engine.forget(endpoint.id)
        for model in sorted(endpoint.models):
            self.schedule_check(model)

    async def check_all(self, timeout_s: float) -> None:
        """Check every model the engines serve; what is not done by `timeout_s` goes on."""
        tasks = [t for t in map(self.schedule_check, sorted(self._registry.known_models())) if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def check(self, model: str) -> TokenizerStatus:
        setting = self._settings.get(model, AUTO)
        endpoint = min(self._registry.candidates(model), key=lambda e: e.load, default=None)
        if endpoint is None:
            return self._set(model, TokenizerStatus(ENGINE, f"no available engine serves model {model} to check against"))
        expected: list[list[int]] | None = None
        engine_problem = None
        try:
            expected = [await self._engine.tokenize(endpoint, model, probe) for probe in PROBES]
        except TokenizationFailed as exc:
            engine_problem = str(exc)
        local, load_problem = await self._local_for(setting, endpoint, model)
        if local is not None and expected is not None:
            if [local.encode(p) for p in PROBES] == expected:
                self._use_local[model] = local
                return self._set(model, TokenizerStatus(f"local {local.source}"))
            self._use_local.pop(model, None)
            problem = (
                f"tokenizer {local.source} gives other token ids than engine {endpoint.id} for model {model}; "
                f"the engines tokenize instead (one extra hop per request). Fix: set models[].tokenizer to the "
                f"files the engine loads (its --tokenizer or --model), or `engine`."
            )
            return self._set(model, TokenizerStatus(ENGINE, problem))
        if local is not None:
            # The engine could not say: keep the local tokenizer, which was asked for, but say so.
            self._use_local[model] = local
            return self._set(model, TokenizerStatus(
                f"local {local.source}", f"cannot verify tokenizer {local.source} against engine: {engine_problem}"
            ))  # fmt: skip
        self._use_local.pop(model, None)
        if expected is not None:
            return self._set(model, TokenizerStatus(ENGINE, load_problem))
        problem = f"cannot tokenize for model {model}: {engine_problem}"
        if load_problem:
            problem += f"; {load_problem}"
        return self._set(model, TokenizerStatus(ENGINE, problem + ". Prefix routing is off for it."))

    async def _local_for(self, setting: str, endpoint: Endpoint, model: str) -> tuple[HFPromptTokenizer | None, str | None]:
        """(the local tokenizer for this setting, or None; a problem worth reporting)."""
        if setting == ENGINE:
            return None, None
        source, local_files_only = setting, False
        if setting == AUTO:
            root = _card_root(endpoint, model)
            if root is None:
                return None, None
            # Automatic: never a download from the gateway's host, only files already here.
            source, local_files_only = root, True
        loaded = self._loaded.get(source)
        if loaded is not None:
            return loaded, None
        try:
            loaded = await asyncio.to_thread(
                HFPromptTokenizer, source, local_files_only=local_files_only, executor=self._executor,
                offload_min_chars=self._offload_min_chars, head_chars=self._head_chars,
            )  # fmt: skip
        except Exception as exc:  # missing files, no network, not a tokenizer
            if setting == AUTO:
                logger.info("model %s: no local tokenizer at %s (%s); the engines tokenize", model, source,
                            type(exc).__name__)  # fmt: skip
                return None, None
            return None, f"cannot load tokenizer {source} for model {model}: {type(exc).__name__}: {exc}"
        self._loaded[source] = loaded
        if self._on_loaded is not None:
            self._on_loaded()
        return loaded, None

    def _set(self, model: str, status: TokenizerStatus) -> TokenizerStatus:
        previous = self.status.get(model)
        self.status[model] = status
        if status != previous:
            if status.ok:
                logger.info("model %s: tokenizer %s, token ids equal the engine's", model, status.source)
            else:
                logger.warning("model %s: %s", model, status.problem)
        if self._on_status is not None:
            self._on_status(model, status)
        return status

    async def close(self) -> None:
        """Stop the checks under way (before the client they use closes), then the tokenizers."""
        self._closed = True
        await cancel_and_wait(self._checks.values())
        for tokenizer in self._loaded.values():
            tokenizer.close()


def _card_root(endpoint: Endpoint, model: str) -> str | None:
    """Where the engine loaded `model` from, if this host can read it: a directory, or an id
    (`org/name`) that may be in the local Hugging Face cache."""
    for card in endpoint.model_cards:
        if card.get("id") == model:
            root = card.get("root")
            if not isinstance(root, str) or not root:
                return None
            if Path(root).is_dir() or (root.count("/") == 1 and not root.startswith((".", "/"))):
                return root
    return None
