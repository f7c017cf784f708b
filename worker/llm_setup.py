"""litellm's per-call set-up on the event loop instead of a thread (issue #21).

litellm 1.82.6's ``acompletion`` and ``aembedding`` run the synchronous ``completion()`` and
``embedding()`` (parameter mapping and request building) in the loop's default executor on every
call, then await the coroutine that returns (``litellm/main.py``, lines 612 and 4580). The work
itself is the same on either thread; what the thread adds is a hand-off each way, the GIL passed
back and forth with the event loop, and a wake-up of the loop per call.

:class:`LoopExecutor`, installed as the loop's default executor by :func:`install`, runs exactly
those set-ups inline, and only inside :func:`inline` (a call to a provider in
:data:`PURE_SETUP`); everything else that uses the default executor (``asyncio.to_thread`` for a
large prompt's token count, ``getaddrinfo``) still goes to its threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import litellm

# Providers whose synchronous set-up in litellm 1.82.6 does no I/O with an api_key given (no token
# refresh, no credential chain): run on the loop it would otherwise block.
PURE_SETUP = frozenset(
    {"openai", "anthropic", "gemini", "cohere", "cohere_chat", "perplexity", "hosted_vllm"}
)

_INLINE: contextvars.ContextVar[bool] = contextvars.ContextVar("worker_llm_inline_setup", default=False)
_installed: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _setups() -> tuple[Any, ...]:
    return (litellm.main.completion, litellm.main.embedding)


def is_setup(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is litellm's ``partial(context.run, partial(completion or embedding, ...))``."""
    return (
        isinstance(fn, functools.partial)
        and isinstance(getattr(fn.func, "__self__", None), contextvars.Context)
        and len(fn.args) == 1
        and isinstance(fn.args[0], functools.partial)
        and fn.args[0].func in _setups()
    )


class LoopExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that runs litellm's call set-up in the caller's thread when asked to."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        if not (_INLINE.get() and not args and not kwargs and is_setup(fn)):
            return super().submit(fn, *args, **kwargs)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - as a pool thread would: the awaiting call raises it
            future.set_exception(exc)
        return future


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Make a :class:`LoopExecutor` ``loop``'s default executor (once per loop)."""
    if loop not in _installed:
        loop.set_default_executor(LoopExecutor(thread_name_prefix="asyncio"))
        _installed.add(loop)


@contextlib.contextmanager
def inline(on: bool = True) -> Iterator[None]:
    """litellm calls made in this block (by this task) set up on the loop when ``on``."""
    token = _INLINE.set(on)
    try:
        yield
    finally:
        _INLINE.reset(token)
