"""What a message's content parts may hold, checked before anything else reads them (issue #16).

litellm reads parts in ways a sender can turn against the worker's own host: it downloads image
URLs to inline them for Anthropic (``http://``) and Gemini (any scheme), treats a Gemini
``file_id`` that is a URL as something to fetch, and its token counter fetches an ``image_url``
marked ``detail: high``. A part it does not know raises inside token counting. So only what
the contract allows goes through, each part checked on its own:

- ``{"type": "text", "text": str}``
- ``{"type": "image_url", "image_url": {"url": "data:image/...;base64,...", "detail"?: ...}}``
- ``{"type": "input_audio", "input_audio": {"data": base64, "format": "wav" | "mp3"}}``
- ``{"type": "file", "file": {"file_data": "data:...;base64,..."}}`` or ``{"file_id": ...}``
  (a provider's own file id, never a URL)

Anything else (another type, a missing or extra field, a remote or ``file://`` URL) is refused,
and the refusal names the part (``messages.0.content.1``) so the sender knows what to fix. The
one exception: an ``image_url`` whose https URL names a host of ``llm.remote_images.hosts``
(:class:`~worker.boundary.urls.HostAllowlist`), which the worker fetches itself and inlines
(:mod:`worker.boundary.fetch`) before litellm sees the request. By default that list is empty
and no URL is fetched.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from typing import Any

from worker.boundary.urls import HostAllowlist
from worker.messages import ChatMessage

# Any URI scheme ("http:", "gs:", "file:", "data:"): a file id that has one is a location.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_DATA_URI = re.compile(r"^data:([a-z]+/[A-Za-z0-9.+-]+);base64,", re.IGNORECASE)
_DETAILS = ("auto", "low", "high")
_AUDIO_FORMATS = ("wav", "mp3")
_SHOWN_CHARS = 40  # of a sender's value quoted back in a refusal


class PartRefused(ValueError):
    """A content part the contract does not allow; the message says why, the caller says where."""


def refusal(messages: Sequence[ChatMessage], remote: HostAllowlist | None = None) -> tuple[str, str] | None:
    """``(where, problem)`` for the first content part that is not allowed, or None; image URLs
    that ``remote`` allows are allowed (they are fetched later, in the pipeline)."""
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            try:
                check_part(part, remote)
            except PartRefused as exc:
                return f"messages.{i}.content.{j}", str(exc)
    return None


def check_part(part: Any, remote: HostAllowlist | None = None) -> None:
    """Raise :class:`PartRefused` unless ``part`` is one of the allowed content parts (an image
    URL only where ``remote`` allows it)."""
    if not isinstance(part, dict):
        raise PartRefused(f"a content part is an object with a 'type', not {type(part).__name__}")
    kind = part.get("type")
    if kind is None:
        raise PartRefused(f"'type' is missing (one of: {', '.join(_CHECKS)})")
    check = _CHECKS.get(kind) if isinstance(kind, str) else None
    if check is None:
        raise PartRefused(f"unknown content part type {_shown(kind)} (one of: {', '.join(_CHECKS)})")
    _only(part, {"type", kind, "cache_control"}, required=frozenset({kind}))
    if "cache_control" in part and part["cache_control"] != {"type": "ephemeral"}:
        raise PartRefused("cache_control: only {'type': 'ephemeral'} is allowed")
    if kind == "image_url":
        _image_url(part[kind], remote)
    else:
        check(part[kind])


def _text(value: Any) -> None:
    if not isinstance(value, str):
        raise PartRefused(f"text: a string, not {type(value).__name__}")


def _image_url(value: Any, remote: HostAllowlist | None = None) -> None:
    if not isinstance(value, dict):
        raise PartRefused("image_url: an object {'url': 'data:image/...;base64,...'}")
    _only(value, {"url", "detail", "format"}, required=frozenset({"url"}), where="image_url")
    url = value["url"]
    if remote and isinstance(url, str) and url[:5].lower() != "data:":
        problem = remote.refusal(url)
        if problem is not None:
            raise PartRefused(f"image_url.url: {problem} (or send the image inline as a data: URI)")
    else:
        _data_uri(url, "image_url.url", media="image/")
    if "detail" in value and value["detail"] not in _DETAILS:
        raise PartRefused(f"image_url.detail: one of {', '.join(_DETAILS)}")
    if "format" in value and not (isinstance(value["format"], str) and value["format"].startswith("image/")):
        raise PartRefused("image_url.format: a media type such as image/png")


def _input_audio(value: Any) -> None:
    if not isinstance(value, dict):
        raise PartRefused("input_audio: an object {'data': base64, 'format': 'wav' or 'mp3'}")
    _only(value, {"data", "format"}, required=frozenset({"data", "format"}), where="input_audio")
    if value["format"] not in _AUDIO_FORMATS:
        raise PartRefused(f"input_audio.format: one of {', '.join(_AUDIO_FORMATS)}")
    _base64(value["data"], "input_audio.data")


def _file(value: Any) -> None:
    if not isinstance(value, dict):
        raise PartRefused("file: an object with file_data (a data: URI) or file_id")
    _only(value, {"file_id", "file_data", "filename", "format"}, where="file")
    if ("file_id" in value) == ("file_data" in value):
        raise PartRefused("file: exactly one of file_id or file_data")
    if "file_data" in value:
        _data_uri(value["file_data"], "file.file_data")
        return
    file_id = value["file_id"]
    if not isinstance(file_id, str) or not file_id:
        raise PartRefused("file.file_id: a non-empty string")
    if _SCHEME.match(file_id):
        raise PartRefused("file.file_id: a provider's file id, not a URL (the worker fetches nothing)")


_CHECKS: dict[str, Callable[[Any], None]] = {
    "text": _text,
    "image_url": _image_url,
    "input_audio": _input_audio,
    "file": _file,
}


def _only(
    value: dict[str, Any], allowed: set[str], *, required: frozenset[str] = frozenset(), where: str = ""
) -> None:
    prefix = f"{where}." if where else ""
    unknown = [key for key in value if key not in allowed]
    if unknown:
        raise PartRefused(f"{prefix}{_shown(unknown[0])}: unknown field")
    missing = sorted(required - value.keys())
    if missing:
        raise PartRefused(f"{prefix}{missing[0]}: required field is missing")


def _data_uri(value: Any, where: str, *, media: str = "") -> None:
    if not isinstance(value, str):
        raise PartRefused(f"{where}: a data: URI string, not {type(value).__name__}")
    match = _DATA_URI.match(value)
    if match is None or not match.group(1).lower().startswith(media):
        scheme = _SCHEME.match(value)
        shown = f"a {scheme.group(0)} URL" if scheme else "not a URI"
        raise PartRefused(
            f"{where}: only inline data ('data:{media or '<type>/'}...;base64,...') is accepted, "
            f"{shown} was sent (the worker fetches nothing)"
        )
    _base64(value[match.end() :], where)


def _base64(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value:
        raise PartRefused(f"{where}: base64 data is missing")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PartRefused(f"{where}: not valid base64") from None


def _shown(value: Any) -> str:
    """A sender's value, quoted and cut, to name it in a refusal without echoing a payload."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
