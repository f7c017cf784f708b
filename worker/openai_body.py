"""The openai SDK's walk of every chat request body, skipped where it cannot change it (issue #21).

litellm sends OpenAI-style chat calls through the openai SDK, whose ``AsyncCompletions.create``
passes the body to ``async_maybe_transform``: a walk of the body against the TypedDict annotations
of ``CompletionCreateParams``, renaming the keys those annotations alias and formatting the values
they mark (dates, base64 files), and dropping the parameters not given. In openai 2.54 no chat
parameter, at any depth, carries an alias or a format, so for a body of plain JSON values (what
litellm builds from a request's messages and parameters) the walk returns the body minus the
parameters not given, at ~0.27 ms of CPU per call (a fifth of litellm's own per call with the rest
of the worker's cuts; ``bench/litellm_paths.py``).

:func:`install` checks those annotations once and, only when none carries an alias or a format,
puts :func:`_skip_plain` in the SDK's place: the body as the walk would return it when it holds
nothing but ``dict`` (of ``str`` keys), ``list``, ``str``, ``int``, ``float``, ``bool`` and
``None``; the SDK's own walk otherwise (a pydantic model, a tuple, a file...). A later SDK that
adds an alias or a format to a chat parameter keeps its walk, with a warning at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import structlog
import typing_extensions as te

log = structlog.get_logger("worker.openai_body")

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def is_plain(body: Any) -> bool:
    """Whether ``body`` holds only JSON's own types (no recursion: a deep body cannot overflow)."""
    stack = [body]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind in _PLAIN_SCALARS:
            continue
        if kind is dict:
            if not all(type(key) is str for key in value):
                return False
            stack.extend(value.values())
        elif kind is list:
            stack.extend(value)
        else:
            return False
    return True


def _annotations(root: Any) -> Iterator[Any]:
    """Every type reachable from ``root``: TypedDict fields, union members, container items,
    ``Annotated`` metadata included (each type once)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        hint = stack.pop()
        if id(hint) in seen:
            continue
        seen.add(id(hint))
        yield hint
        # typing_extensions': the SDK's TypedDicts are its own, which typing's is_typeddict misses
        if te.is_typeddict(hint):
            stack.extend(te.get_type_hints(hint, include_extras=True).values())
        origin = te.get_origin(hint)
        if origin is te.Annotated:
            stack.extend(hint.__metadata__)
        if origin is not te.Literal:
            stack.extend(te.get_args(hint))


def transform_changes_plain_bodies(params: Any, property_info: type[Any]) -> str | None:
    """The first field of ``params`` (a TypedDict) whose annotation renames or formats a value
    (``property_info`` is the SDK's ``PropertyInfo``), or None when a plain body comes back as sent."""
    for hint in _annotations(params):
        if isinstance(hint, property_info) and (hint.alias is not None or hint.format is not None):
            return repr(hint)
    return None


def install() -> bool:
    """Skip the openai SDK's walk of plain chat bodies, when its annotations allow it (True)."""
    from openai._utils import PropertyInfo, is_given
    from openai.resources.chat.completions import completions
    from openai.types.chat import completion_create_params as params

    if getattr(getattr(completions, "async_maybe_transform"), "_worker_skips_plain", False):  # noqa: B009
        return True
    for kind in (params.CompletionCreateParamsNonStreaming, params.CompletionCreateParamsStreaming):
        try:
            changing = transform_changes_plain_bodies(kind, PropertyInfo)
        except Exception as exc:  # noqa: BLE001 - an annotation this walk cannot resolve: keep the SDK's
            changing = f"{type(exc).__name__}: {exc}"
        if changing is not None:
            log.warning("openai_body.walk_kept", params=kind.__name__, because=changing[:200])
            return False
    walk: Callable[..., Any] = getattr(completions, "async_maybe_transform")  # noqa: B009 - not exported

    async def _skip_plain(data: object, expected_type: object) -> Any:
        if type(data) is dict:
            given = {key: value for key, value in data.items() if is_given(value)}
            if is_plain(given):
                return given
        return await walk(data, expected_type)

    _skip_plain._worker_skips_plain = True  # type: ignore[attr-defined]
    _skip_plain.__wrapped__ = walk  # type: ignore[attr-defined]
    setattr(completions, "async_maybe_transform", _skip_plain)  # noqa: B010 - not exported
    return True
