"""Decode vLLM's KV-event payloads (msgpack) into domain events.

A message on the wire is three ZMQ frames: topic, an 8-byte big-endian sequence number, and
a msgpack `EventBatch` array `[ts, events, data_parallel_rank?]`. Each event is either

- a map with a `type` key (vLLM from mid-2026: msgspec `tag=True` structs), e.g.
  `{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ..., "token_ids": [...],
  "block_size": 32, "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": ...}`
- or a positional array tagged by its type name (older releases, `array_like=True`):
  `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name?, extra_keys?]`, `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`.

Fields added in later releases are optional; unknown event types are skipped, so a newer
engine does not break an older gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from engine_adapter.events.model import AllChunksCleared, CacheEvent, ChunkRemoved, ChunkStored, EventBatch

DEFAULT_MEDIUM = "GPU"

# Positional layouts of the array encoding, after the type tag.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys")  # fmt: skip
_REMOVED_FIELDS = ("block_hashes", "medium")


class EventDecodeError(ValueError):
    pass


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise EventDecodeError(f"sequence frame has {len(frame)} bytes, expected 8")
    return int.from_bytes(frame, "big", signed=True)


def decode_batch(seq: int, payload: bytes) -> EventBatch:
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise EventDecodeError(f"payload is not msgpack: {exc}") from exc
    if not isinstance(raw, (list, tuple)) or len(raw) < 2 or not isinstance(raw[1], (list, tuple)):
        raise EventDecodeError("payload is not an [ts, events, ...] batch")
    if not isinstance(raw[0], (int, float)):
        raise EventDecodeError(f"batch timestamp is {type(raw[0]).__name__}, not a number")
    dp_rank = raw[2] if len(raw) > 2 and isinstance(raw[2], int) else None
    events = tuple(e for e in (decode_event(item) for item in raw[1]) if e is not None)
    return EventBatch(seq=seq, ts=float(raw[0]), events=events, data_parallel_rank=dp_rank)


def decode_event(item: Any) -> CacheEvent | None:
    if isinstance(item, dict):
        kind, fields = item.get("type"), item
    elif isinstance(item, (list, tuple)) and item and isinstance(item[0], str):
        kind, fields = item[0], _positional(item[0], item[1:])
    else:
        raise EventDecodeError(f"event is neither a map nor a tagged array: {type(item).__name__}")
    if kind == "BlockStored":
        return _stored(fields)
    if kind == "BlockRemoved":
        return ChunkRemoved(
            block_hashes=tuple(_hashes(fields.get("block_hashes"))),
            medium=fields.get("medium") or DEFAULT_MEDIUM,
        )
    if kind == "AllBlocksCleared":
        return AllChunksCleared()
    return None


def _positional(kind: str, values: Sequence[Any]) -> dict[str, Any]:
    names = _STORED_FIELDS if kind == "BlockStored" else _REMOVED_FIELDS if kind == "BlockRemoved" else ()
    return dict(zip(names, values))


def _hashes(value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise EventDecodeError("block_hashes must be a list")
    return [_hash(h) for h in value]


def _hash(value: Any) -> Any:
    if isinstance(value, (int, bytes)):
        return value
    if isinstance(value, (list, tuple)):  # some builds send hashes as byte arrays
        return bytes(value)
    raise EventDecodeError(f"unsupported block hash type {type(value).__name__}")


def _stored(fields: dict[str, Any]) -> ChunkStored:
    block_hashes = tuple(_hashes(fields.get("block_hashes")))
    token_ids = fields.get("token_ids")
    block_size = fields.get("block_size")
    if not isinstance(token_ids, (list, tuple)) or not isinstance(block_size, int) or block_size <= 0:
        raise EventDecodeError("BlockStored needs token_ids and a positive block_size")
    if len(token_ids) != block_size * len(block_hashes):
        raise EventDecodeError(
            f"BlockStored has {len(token_ids)} tokens for {len(block_hashes)} blocks of {block_size}"
        )
    parent = fields.get("parent_block_hash")
    lora_name = fields.get("lora_name")
    return ChunkStored(
        block_hashes=block_hashes,
        parent_block_hash=None if parent is None else _hash(parent),
        token_ids=tuple(token_ids),
        block_size=block_size,
        medium=fields.get("medium") or DEFAULT_MEDIUM,
        lora_name=lora_name,
        cache_salt=_cache_salt(fields.get("extra_keys"), lora_name) if parent is None else None,
    )


def _cache_salt(extra_keys: Any, lora_name: str | None) -> str | None:
    """The salt is the untagged string in the first block's extra keys that is not the LoRA
    name (vLLM lists: LoRA name, multimodal pairs, cache salt, prompt-embed digests)."""
    if not isinstance(extra_keys, (list, tuple)) or not extra_keys or not extra_keys[0]:
        return None
    strings = [k for k in extra_keys[0] if isinstance(k, str)]
    if lora_name is not None and strings and strings[0] == lora_name:
        strings = strings[1:]
    return strings[-1] if strings else None
