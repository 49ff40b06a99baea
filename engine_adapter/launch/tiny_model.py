"""Build the tiny test model locally: a random-weight Llama and a byte-level BPE tokenizer
trained on generated text. Nothing is downloaded; the same spec always gives the same files.

    python -m engine_adapter.launch.tiny_model .cache/tiny-llama
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# A Llama-3-style template: special header tokens, one turn per message, optional tools.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nTools:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@dataclass(frozen=True)
class TinyModelSpec:
    # Big enough that prefill dominates HTTP overhead on 2 CPU cores (measured in bench/),
    # small enough to start fast and keep CI short.
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    vocab_size: int = 4096
    max_position_embeddings: int = 32768
    seed: int = 1234
    format_version: int = 1

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _corpus(seed: int, num_lines: int = 6000) -> list[str]:
    """Pseudo-English: words made of syllables, with punctuation, digits and code-like lines,
    so the BPE learns merges that cover whatever tests and benchmarks send."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "er", "an", "in"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)})
    common = "the of and to in is you that it he was for on are as with his they at be this have from".split()
    lines = []
    for _ in range(num_lines):
        n = rng.randint(4, 30)
        ws = [rng.choice(common) if rng.random() < 0.3 else rng.choice(words) for _ in range(n)]
        if rng.random() < 0.2:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 99999)))
        line = " ".join(ws)
        line = line[0].upper() + line[1:] + rng.choice([".", "?", "!", ",", ":", ";"])
        if rng.random() < 0.1:
            line = f"def {rng.choice(words)}(x, y):\n    return x + y  # {rng.choice(words)}"
        lines.append(line)
    return lines


def build_tokenizer(spec: TinyModelSpec, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    bos = SPECIAL_TOKENS[0]
    # Prepend BOS like Llama does, so completions and chat both start with it.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def build_model(spec: TinyModelSpec, out_dir: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[no-untyped-call,arg-type]
    model.save_pretrained(out_dir, safe_serialization=True)


def ensure_tiny_model(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Build the model into `out_dir` unless an identical build is already there."""
    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    stamp = out / ".tiny-model-spec"
    if stamp.exists() and stamp.read_text().strip() == spec.fingerprint():
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(spec, out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    build_model(spec, out, len(tok), tok.bos_token_id, tok.eos_token_id)
    stamp.write_text(spec.fingerprint() + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=".cache/tiny-llama")
    args = parser.parse_args()
    print(ensure_tiny_model(args.out_dir))


if __name__ == "__main__":
    main()
