"""Texts encoded from cached words give exactly the tokenizer's ids, and the encoder refuses
tokenizers for which that would not hold."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from gateway.tokenization import segments
from gateway.tokenization.segments import THREAD_SLICE_CHARS, SegmentEncoder, _slices, split_words
from gateway.tokenization.tokenizer import _SEGMENT_PROBES, COMPLETIONS_PATH, HFPromptTokenizer


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def texts(seed: int, count: int) -> list[str]:
    """Prose, code and whitespace mixed at random: every kind of character beside a space."""
    parts = ["ka", "lo", "Mi", " ", " ", " ", "\n", "\n\n", "\t", "  ", "   ", "漢字", "🚀", "é", "42", "7", ".", ",",
             "'s", "'ll", "(", ")", "{", "\u00a0", "\u3000", "½", "-", "_", "\r\n", "    def"]  # fmt: skip
    rng = random.Random(seed)
    return ["".join(rng.choice(parts) for _ in range(rng.randint(0, 400))) for _ in range(count)]


def test_words_join_back_to_the_text() -> None:
    for text in [*texts(1, 200), "", " ", "  ", "a", " a ", "a  b", "\n a"]:
        assert " ".join(split_words(text)) == text


def test_words_are_cut_only_at_spaces_after_a_non_space() -> None:
    """Every whitespace character before a space keeps that space in its pre-token: the text
    is cut only where `(?<=\\S) ` matches, whichever way `split_words` finds that out."""
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    cases = [f"ab{space} cd ef" for space in spaces] + [f"ab {space} cd é" for space in spaces] + texts(5, 200)
    for text in [*cases, " ab cd", " ab  cd", "  ab cd", " \tab cd"]:
        words = split_words(text)
        if words[0] == "" and len(words) > 1:  # one space at the start cut off as an empty first word: as good a cut
            words = [" " + words[1], *words[2:]]
        assert words == re.split(r"(?<=\S) ", text), repr(text)


def test_encodings_equal_the_tokenizers_on_varied_text(backend: Tokenizer) -> None:
    encoder = SegmentEncoder.for_tokenizer(backend, _SEGMENT_PROBES)
    assert encoder is not None  # the test model's byte-level BPE cuts pre-tokens before spaces
    for text in texts(2, 300) * 2:  # twice: the second time every word comes from the tables
        assert encoder.encode(text).tolist() == backend.encode(text, add_special_tokens=False).ids
    assert encoder._spaced and encoder._first


def test_a_head_is_the_start_of_the_whole_encoding(backend: Tokenizer) -> None:
    encoder = SegmentEncoder(backend)
    for text in texts(3, 100):
        whole = backend.encode(text, add_special_tokens=False).ids
        found = encoder.head(text, 64)
        if found is None:
            assert " " not in text[1:65]  # no word ends within the limit
            continue
        ids, num_chars = found
        assert num_chars <= 64 and ids.tolist() == whole[: len(ids)]
        assert ids.tolist() == backend.encode(text[:num_chars], add_special_tokens=False).ids


def test_the_tables_are_bounded(backend: Tokenizer) -> None:
    encoder = SegmentEncoder(backend, max_cached_words=50)
    for text in texts(4, 40):
        assert encoder.encode(text).tolist() == backend.encode(text, add_special_tokens=False).ids
        assert len(encoder._spaced) <= 50 and len(encoder._first) <= 50
    long_word = "x" * 1000
    encoder.encode("a " + long_word)
    assert long_word not in encoder._spaced  # text without spaces is encoded, not kept


def test_tokenizers_where_words_are_not_exact_are_refused() -> None:
    vocab = {c: i for i, c in enumerate("abcdefghij ▁")}
    # SentencePiece-style: every text gets "▁" in front, so " b" alone is not " b" after "a".
    metaspace = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    metaspace.normalizer = normalizers.Prepend("▁")
    metaspace.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    assert SegmentEncoder.for_tokenizer(metaspace, ["ab cd e"]) is None
    # A token for a run of spaces: a cut could fall inside it.
    spaces = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    spaces.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    spaces.add_tokens([AddedToken("  ", normalized=False)])
    assert SegmentEncoder.for_tokenizer(spaces, ["ab cd e"]) is None


def test_a_long_text_encoded_off_the_event_loop_slice_by_slice_is_exact(
    backend: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hand_overs: list[int] = []
    monkeypatch.setattr(segments, "_hand_over_the_gil", lambda: hand_overs.append(1))
    encoder = SegmentEncoder(backend)
    for text in texts(5, 40):
        long_text = text * 40  # several slices, cut wherever a word starts
        slices = list(_slices(long_text, THREAD_SLICE_CHARS))
        assert "".join(slices) == long_text and (len(slices) > 1 or len(long_text) < 2 * THREAD_SLICE_CHARS)
        hand_overs.clear()
        assert encoder.encode(long_text).tolist() == backend.encode(long_text, add_special_tokens=False).ids
        # The GIL offered to the event loop after each slice (a text of one slice: no need).
        assert len(hand_overs) == (len(slices) if len(long_text) > THREAD_SLICE_CHARS else 0)


def test_special_tokens_around_a_text_are_the_tokenizers(backend: Tokenizer) -> None:
    encoder = SegmentEncoder.for_tokenizer(backend, _SEGMENT_PROBES)
    assert encoder is not None and encoder._affixes == ([backend.token_to_id("<|begin_of_text|>")], [])
    for text in ["", *texts(6, 50)]:
        assert encoder.encode(text, add_special_tokens=True).tolist() == backend.encode(text).ids
    # A post-processor that adds ids on both sides.
    both = Tokenizer.from_str(backend.to_str())
    both.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A <|end_of_text|>", special_tokens=[
        ("<|begin_of_text|>", backend.token_to_id("<|begin_of_text|>")),
        ("<|end_of_text|>", backend.token_to_id("<|end_of_text|>")),
    ])  # fmt: skip
    encoder = SegmentEncoder.for_tokenizer(both, _SEGMENT_PROBES)
    assert encoder is not None and encoder._affixes is not None and encoder._affixes[1]
    for text in texts(7, 50):
        assert encoder.encode(text, add_special_tokens=True).tolist() == both.encode(text).ids


def test_prompt_tokenizer_encodes_completions_and_chats_from_words_exactly(tiny_model_dir: Path) -> None:
    tokenizer = HFPromptTokenizer(tiny_model_dir)
    assert tokenizer._segments is not None
    for text in texts(8, 30):
        whole = tokenizer._tokenizer.encode(text)  # transformers' own, special tokens added
        assert tokenizer.token_ids_sync(COMPLETIONS_PATH, {"prompt": text}) == whole
    assert tokenizer._segments._spaced  # encoded from words, not whole
    tokenizer.close()
