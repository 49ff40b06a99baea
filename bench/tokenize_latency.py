"""Tokenization cost and its effect on the event loop.

    python -m bench.tokenize_latency

For prompts of growing size: the time to tokenize (completion prompt, and chat template +
tokenize), and the longest stall a 1 ms ticker on the event loop sees while 5 such prompts
are tokenized, inline on the loop versus in the worker thread the gateway uses for long
prompts (kv_index.tokenize_offload_min_chars).
"""

from __future__ import annotations

import asyncio
import statistics
import time

from bench.common import ROOT, markdown_table, write_report
from gateway.tokenization.tokenizer import HFPromptTokenizer


def filler(num_words: int) -> str:
    return " ".join(f"w{i} tasu kenomi" for i in range(num_words // 3))


async def max_stall_ms(tokenizer: HFPromptTokenizer, path: str, body: dict[str, object]) -> float:
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    for _ in range(5):
        await tokenizer.token_ids(path, body)
    done = True
    await task
    return max(gaps) * 1000


async def run() -> str:
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model(ROOT / ".cache" / "tiny-llama")
    inline = HFPromptTokenizer(model_dir, offload_min_chars=10**12)
    offloaded = HFPromptTokenizer(model_dir, offload_min_chars=0)
    rows = []
    for num_words in (300, 3000, 12000, 30000):
        text = filler(num_words)
        chat = {"messages": [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]}
        completion = {"prompt": text}
        tokens = len(inline.token_ids_sync("/v1/completions", completion) or [])
        timings = []
        for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
            samples = []
            for _ in range(7):
                start = time.perf_counter()
                inline.token_ids_sync(path, body)
                samples.append((time.perf_counter() - start) * 1000)
            timings.append(statistics.median(samples))
        stall_inline = await max_stall_ms(inline, "/v1/chat/completions", chat)
        stall_thread = await max_stall_ms(offloaded, "/v1/chat/completions", chat)
        rows.append([tokens, len(text), timings[0], timings[1], stall_inline, stall_thread])
    inline.close()
    offloaded.close()
    return markdown_table(
        ["prompt tokens", "chars", "completion ms (median)", "chat ms (median)",
         "max loop stall inline ms", "max loop stall worker thread ms"],
        rows,
    )  # fmt: skip


def main() -> None:
    table = asyncio.run(run())
    print(table)
    print(f"\nreport: {write_report('tokenize', 'Tokenization cost and event-loop stalls', table)}")


if __name__ == "__main__":
    main()
