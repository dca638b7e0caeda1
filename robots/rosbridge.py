"""The rosbridge v2 protocol: operation checks, fragments and png compression.

A rosbridge message is one JSON object with an `op` field (and an optional `id`). The operations
a server handles: advertise, unadvertise, publish, subscribe, unsubscribe, call_service,
advertise_service, unadvertise_service, service_response, fragment, png, set_level. Every check
here raises `ProtocolError` naming the field at fault; servers answer it with a `status` message.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math

DEFAULT_PORT = 9090
DEFAULT_MAX_MESSAGE_BYTES = 10_000_000  # rosbridge's default max message size
MAX_NAME_LENGTH = 256
MAX_FRAGMENTS = 10_000
MAX_PENDING_FRAGMENTED = 16
STATUS_LEVELS = ("none", "error", "warning", "info")
COMPRESSIONS = ("none", "png")


class ProtocolError(ValueError):
    """A rosbridge message that breaks the protocol (bad op, missing or wrongly typed field)."""


def decode(text: str | bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict:
    if isinstance(text, (bytes, bytearray)):
        raise ProtocolError("binary frames (BSON/CBOR) are not supported; send JSON text frames")
    if len(text) > max_bytes:
        raise ProtocolError(f"message of {len(text)} bytes exceeds the maximum of {max_bytes}")
    try:
        message = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise ProtocolError(f"not valid JSON ({str(err)[:120]})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a JSON object, got {type(message).__name__}")
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError("missing or non-string 'op' field")
    return message


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def encode(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def name_field(message: dict, key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{message.get('op')}: field {key!r} must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH or not value.isprintable():
        raise ProtocolError(f"{message.get('op')}: field {key!r} is too long or has unprintable characters")
    return value


def optional_int(message: dict, key: str, default: int, low: int = 0, high: int = 2**31) -> int:
    value = message.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or not low <= value <= high:
        raise ProtocolError(f"{message.get('op')}: field {key!r} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def optional_str(message: dict, key: str, default: str | None = None) -> str | None:
    value = message.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"{message.get('op')}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def message_id(message: dict) -> str | None:
    value = message.get("id")
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool) and len(str(value)) <= MAX_NAME_LENGTH:
        return str(value)
    raise ProtocolError("field 'id' must be a short string or integer")


def status(level: str, msg: str, message_id_: str | None = None) -> dict:
    out = {"op": "status", "level": level, "msg": msg}
    if message_id_ is not None:
        out["id"] = message_id_
    return out


# -- fragments -----------------------------------------------------------------------------------

def fragments(text: str, fragment_size: int, message_id_: str) -> list[dict]:
    """Split an encoded message into `fragment` ops of at most `fragment_size` characters."""
    total = max(1, math.ceil(len(text) / fragment_size))
    return [{"op": "fragment", "id": message_id_, "data": text[i * fragment_size:(i + 1) * fragment_size],
             "num": i, "total": total} for i in range(total)]


class FragmentBuffer:
    """Reassembles incoming `fragment` ops, bounded in count and bytes."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.max_bytes = max_bytes
        self.pending: dict[str, dict] = {}

    def add(self, message: dict) -> str | None:
        """The reassembled text once every fragment of an id has arrived, else None."""
        frag_id = message_id(message)
        if frag_id is None:
            raise ProtocolError("fragment: field 'id' is required")
        data = message.get("data")
        if not isinstance(data, str):
            raise ProtocolError("fragment: field 'data' must be a string")
        total = optional_int(message, "total", -1, 1, MAX_FRAGMENTS)
        num = optional_int(message, "num", -1, 0, MAX_FRAGMENTS - 1)
        if num >= total:
            raise ProtocolError(f"fragment: num {num} is not below total {total}")
        entry = self.pending.get(frag_id)
        if entry is None:
            if len(self.pending) >= MAX_PENDING_FRAGMENTED:
                raise ProtocolError(f"fragment: more than {MAX_PENDING_FRAGMENTED} fragmented messages pending")
            entry = self.pending[frag_id] = {"total": total, "parts": {}, "bytes": 0}
        if entry["total"] != total:
            del self.pending[frag_id]
            raise ProtocolError(f"fragment {frag_id!r}: total changed from {entry['total']} to {total}")
        if num not in entry["parts"]:
            entry["bytes"] += len(data)
        entry["parts"][num] = data
        if entry["bytes"] > self.max_bytes:
            del self.pending[frag_id]
            raise ProtocolError(f"fragment {frag_id!r}: reassembled message exceeds {self.max_bytes} bytes")
        if len(entry["parts"]) < total:
            return None
        del self.pending[frag_id]
        return "".join(entry["parts"][i] for i in range(total))


# -- png compression -------------------------------------------------------------------------------

def png_compress(text: str) -> dict:
    """rosbridge's png compression: the UTF-8 bytes as the pixels of a square-ish RGB image padded
    with newlines, PNG-encoded, then base64 (`{"op": "png", "data": ...}`)."""
    from PIL import Image

    raw = text.encode("utf-8")
    width = max(1, int(math.floor(math.sqrt(len(raw) / 3.0))))
    height = max(1, int(math.ceil(len(raw) / 3.0 / width)))
    raw = raw + b"\n" * (width * height * 3 - len(raw))
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), raw).save(buf, format="PNG")
    return {"op": "png", "data": base64.b64encode(buf.getvalue()).decode("ascii")}


def png_decompress(message: dict, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> str:
    from PIL import Image

    data = message.get("data")
    if not isinstance(data, str) or len(data) > max_bytes:
        raise ProtocolError("png: field 'data' must be a base64 string within the size limit")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "PNG" or img.mode != "RGB" or img.size[0] * img.size[1] * 3 > max_bytes:
                raise ProtocolError("png: data is not an RGB PNG within the size limit")
            text = img.tobytes().decode("utf-8")
    except ProtocolError:
        raise
    except (binascii.Error, ValueError, OSError, UnicodeDecodeError) as err:
        raise ProtocolError(f"png: cannot decode ({type(err).__name__})") from None
    except Exception as err:  # PIL raises assorted errors on crafted images
        raise ProtocolError(f"png: cannot decode ({type(err).__name__})") from None
    return text.rstrip("\n")
