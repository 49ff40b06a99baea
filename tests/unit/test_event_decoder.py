from __future__ import annotations

from typing import Any

import msgpack
import pytest

from engine_adapter.events.decoder import EventDecodeError, decode_batch, decode_event, decode_seq
from engine_adapter.events.model import AllChunksCleared, ChunkRemoved, ChunkStored

# Payloads are built the way vLLM's msgspec encoder lays them out: the batch is always an
# array [ts, events, data_parallel_rank]; events are tagged maps (new) or tagged arrays (old).


def stored_map(hashes: list[Any], parent: Any, tokens: list[int], block_size: int = 4, *, medium: str | None = "GPU",
               lora_name: str | None = None, extra_keys: Any = None) -> dict[str, Any]:  # fmt: skip
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": block_size, "lora_id": None, "medium": medium, "lora_name": lora_name,
            "extra_keys": extra_keys}  # fmt: skip


def stored_array(hashes: list[Any], parent: Any, tokens: list[int], block_size: int = 4, *, medium: str | None = "GPU",
                 lora_name: str | None = None, extra_keys: Any = None, short: bool = False) -> list[Any]:  # fmt: skip
    head = ["BlockStored", hashes, parent, tokens, block_size, None, medium]
    return head if short else head + [lora_name, extra_keys]


def batch(events: list[Any], ts: float = 1234.5, dp_rank: int | None = 0) -> bytes:
    return msgpack.packb([ts, events, dp_rank])


def test_decode_seq_is_8_byte_big_endian() -> None:
    assert decode_seq((0).to_bytes(8, "big")) == 0
    assert decode_seq((258).to_bytes(8, "big")) == 258
    assert decode_seq(b"\x00\x00\x00\x00\x00\x00\x01\x00") == 256
    assert decode_seq((-1).to_bytes(8, "big", signed=True)) == -1  # vLLM's end-of-replay marker
    with pytest.raises(EventDecodeError):
        decode_seq(b"\x00\x01")
    with pytest.raises(EventDecodeError):
        decode_seq(b"")


def test_new_map_encoding_decodes_all_event_kinds() -> None:
    payload = batch([
        stored_map([11, 12], None, [1, 2, 3, 4, 5, 6, 7, 8]),
        {"type": "BlockRemoved", "block_hashes": [11], "medium": "CPU"},
        {"type": "AllBlocksCleared"},
    ], ts=99.25, dp_rank=3)  # fmt: skip
    decoded = decode_batch(7, payload)
    assert decoded.seq == 7
    assert decoded.ts == 99.25
    assert decoded.data_parallel_rank == 3
    assert decoded.events == (
        ChunkStored(block_hashes=(11, 12), parent_block_hash=None, token_ids=(1, 2, 3, 4, 5, 6, 7, 8), block_size=4,
                    medium="GPU", lora_name=None, cache_salt=None),  # fmt: skip
        ChunkRemoved(block_hashes=(11,), medium="CPU"),
        AllChunksCleared(),
    )


@pytest.mark.parametrize("short", [False, True], ids=["with-lora-and-extra-keys", "seven-fields"])
def test_old_array_encoding_gives_identical_domain_events(short: bool) -> None:
    tokens = list(range(100, 112))
    new = batch([
        stored_map([21, 22, 23], 20, tokens, medium="CPU"),
        {"type": "BlockRemoved", "block_hashes": [21, 22], "medium": "CPU"},
        {"type": "AllBlocksCleared"},
    ])  # fmt: skip
    old = batch([
        stored_array([21, 22, 23], 20, tokens, medium="CPU", short=short),
        ["BlockRemoved", [21, 22], "CPU"],
        ["AllBlocksCleared"],
    ])  # fmt: skip
    assert decode_batch(5, old) == decode_batch(5, new)
    assert len(decode_batch(5, old).events) == 3


def test_old_and_new_encodings_agree_on_lora_and_salt() -> None:
    tokens = [9, 8, 7, 6]
    extra = [["my-lora", "salt1"]]
    new = decode_event(stored_map([1], None, tokens, lora_name="my-lora", extra_keys=extra))
    old = decode_event(stored_array([1], None, tokens, lora_name="my-lora", extra_keys=extra))
    assert new == old
    assert isinstance(new, ChunkStored)
    assert (new.lora_name, new.cache_salt) == ("my-lora", "salt1")


def test_batch_without_dp_rank() -> None:
    decoded = decode_batch(1, msgpack.packb([1.0, [{"type": "AllBlocksCleared"}]]))
    assert decoded.data_parallel_rank is None
    assert decoded.events == (AllChunksCleared(),)


@pytest.mark.parametrize("encode", [stored_map, stored_array], ids=["map", "array"])
def test_missing_medium_defaults_to_gpu(encode: Any) -> None:
    event = decode_event(encode([1], None, [1, 2, 3, 4], medium=None))
    assert isinstance(event, ChunkStored) and event.medium == "GPU"
    assert decode_event({"type": "BlockRemoved", "block_hashes": [1], "medium": None}) == ChunkRemoved((1,), "GPU")
    assert decode_event(["BlockRemoved", [1], None]) == ChunkRemoved((1,), "GPU")
    assert decode_event(["BlockRemoved", [1]]) == ChunkRemoved((1,), "GPU")  # field omitted entirely


def test_bytes_hashes_survive_msgpack() -> None:
    h1, h2, parent = b"\x01" * 32, b"\x02" * 32, b"\xff" * 32
    decoded = decode_batch(0, batch([stored_map([h1, h2], parent, list(range(8))),
                                     {"type": "BlockRemoved", "block_hashes": [h1], "medium": "GPU"}]))  # fmt: skip
    stored, removed = decoded.events
    assert isinstance(stored, ChunkStored) and isinstance(removed, ChunkRemoved)
    assert stored.block_hashes == (h1, h2)
    assert stored.parent_block_hash == parent
    assert removed.block_hashes == (h1,)
    # A hash removed must compare equal to the one stored (the ingestor maps them).
    assert removed.block_hashes[0] == stored.block_hashes[0]


def test_hashes_sent_as_byte_arrays_become_bytes() -> None:
    event = decode_event(stored_map([[1, 2, 3]], [4, 5], [0, 0, 0, 0]))
    assert isinstance(event, ChunkStored)
    assert event.block_hashes == (b"\x01\x02\x03",)
    assert event.parent_block_hash == b"\x04\x05"


def test_unknown_event_types_are_skipped() -> None:
    payload = batch([
        {"type": "BlockMoved", "block_hashes": [1], "whatever": True},
        ["SomethingNew", 1, 2, 3],
        stored_map([5], None, [1, 2, 3, 4]),
    ])  # fmt: skip
    decoded = decode_batch(3, payload)
    assert len(decoded.events) == 1
    assert isinstance(decoded.events[0], ChunkStored)
    assert decode_event({"type": "BlockMoved"}) is None


def test_extra_fields_from_newer_engines_are_ignored() -> None:
    event = stored_map([5], None, [1, 2, 3, 4])
    event.update(group_idx=0, kv_cache_spec_kind="full_attention", session_id="s")
    decoded = decode_event(event)
    assert isinstance(decoded, ChunkStored) and decoded.block_hashes == (5,)


@pytest.mark.parametrize("tokens", [[1, 2, 3], [1, 2, 3, 4, 5], []])
def test_token_count_must_match_blocks(tokens: list[int]) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(0, batch([stored_map([1], None, tokens, block_size=4)]))
    with pytest.raises(EventDecodeError):
        decode_event(stored_array([1], None, tokens, block_size=4))


@pytest.mark.parametrize("block_size", [0, -4, None])
def test_block_size_must_be_positive(block_size: Any) -> None:
    with pytest.raises(EventDecodeError):
        decode_event(stored_map([], None, [], block_size=block_size))


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"not msgpack at all \xc1\xc1", b"\x92\x01"], ids=["empty", "reserved-byte", "text", "truncated"])  # fmt: skip
def test_non_msgpack_raises(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(0, payload)


@pytest.mark.parametrize("raw", [{"ts": 1, "events": []}, [1.0], [1.0, "events"], 5, "text"])
def test_wrong_batch_shape_raises(raw: Any) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(0, msgpack.packb(raw))


def test_non_numeric_timestamp_raises_decode_error() -> None:
    # Still an [ts, events] array but ts is not a number: as malformed as a wrong shape, and the
    # subscriber only treats EventDecodeError as "undecodable" (reset). float("soon") raises a
    # plain ValueError and float(None) a TypeError instead.
    with pytest.raises(EventDecodeError):
        decode_batch(0, msgpack.packb(["soon", []]))
    with pytest.raises(EventDecodeError):
        decode_batch(0, msgpack.packb([None, []]))


@pytest.mark.parametrize("item", [5, "BlockStored", None, [], [1, 2]])
def test_event_that_is_neither_map_nor_tagged_array_raises(item: Any) -> None:
    with pytest.raises(EventDecodeError):
        decode_event(item)


@pytest.mark.parametrize("bad", [1.5, "abc", {"a": 1}])
def test_unsupported_hash_types_raise(bad: Any) -> None:
    with pytest.raises(EventDecodeError):
        decode_event(stored_map([bad], None, [1, 2, 3, 4]))
    with pytest.raises(EventDecodeError):
        decode_event({"type": "BlockRemoved", "block_hashes": bad, "medium": "GPU"})


# cache_salt: vLLM publishes per-block extra keys untagged: LoRA name first (when a LoRA is
# used), then (mm_identifier, offset) pairs, then the cache salt (first block only), then
# prompt-embeds digests (bytes).


@pytest.mark.parametrize(
    ("lora_name", "extra_keys", "salt"),
    [
        (None, [["salt1"]], "salt1"),
        ("my-lora", [["my-lora", "salt1"]], "salt1"),
        ("my-lora", [["my-lora"]], None),  # LoRA but no salt
        (None, [[["mm-hash", 0], "salt1"]], "salt1"),  # multimodal pair before the salt
        ("my-lora", [["my-lora", ["mm-hash", 3], "salt1", b"\x00" * 32]], "salt1"),  # embeds digest after
        (None, [["salt1"], None], "salt1"),  # only the first block's keys matter
        (None, None, None),
        (None, [None], None),
        (None, [[]], None),
        ("same", [["same", "same"]], "same"),  # salt equal to the LoRA name
    ],
)
def test_cache_salt_from_root_block_extra_keys(lora_name: str | None, extra_keys: Any, salt: str | None) -> None:
    num_blocks = 1 if extra_keys is None else len(extra_keys)
    tokens = list(range(4 * num_blocks))
    hashes = list(range(num_blocks))
    for encoded in (stored_map(hashes, None, tokens, lora_name=lora_name, extra_keys=extra_keys),
                    stored_array(hashes, None, tokens, lora_name=lora_name, extra_keys=extra_keys)):  # fmt: skip
        (event,) = decode_batch(0, batch([encoded])).events  # through msgpack: tuples become lists
        assert isinstance(event, ChunkStored)
        assert event.cache_salt == salt
        assert event.lora_name == lora_name


def test_cache_salt_from_tuples_as_vllm_builds_them() -> None:
    # vLLM builds extra_keys as a list of tuples; msgpack turns them into arrays.
    payload = msgpack.packb([0.0, [stored_map([1], None, [1, 2, 3, 4], lora_name="my-lora",
                                              extra_keys=[("my-lora", "salt1")])], None])  # fmt: skip
    (event,) = decode_batch(0, payload).events
    assert isinstance(event, ChunkStored) and event.cache_salt == "salt1"


def test_cache_salt_only_on_root_block() -> None:
    # A child block's extra keys never carry the salt; even if a string is there it is ignored.
    event = decode_event(stored_map([2], 1, [1, 2, 3, 4], extra_keys=[["salt1"]]))
    assert isinstance(event, ChunkStored) and event.cache_salt is None
