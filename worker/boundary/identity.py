"""Who the caller is: the broker user that published the request, as RabbitMQ vouches for it.

RabbitMQ refuses a message whose ``user_id`` property differs from the user of the connection
that publishes it (validated user-ID), so a delivery's ``user_id`` is its publisher's broker user.
``callers.yaml`` grants each user the agents it may act as and the models it may name; a request
with no ``user_id``, or outside its user's grant, is refused as ``forbidden`` before anything is
claimed, reserved or sent (:class:`~worker.errors.Forbidden`). In ``development`` mode (the offline
profile) every publisher may do anything, which the worker says at start-up. A ``reply_to`` must
be the caller's own (Direct Reply-To, or a queue of ``reply_queue_prefix``): another agent's reply
queue, the request queue or the dead-letter queue is refused, and the answer only dead-lettered.

A replay (``dlq replay``) is published by the operator's user, and names the request's original
caller in ``x-replay-caller``: from a user listed in ``replayers`` the request is served as that
caller (its grant, its reply queue, its result store), from anyone else the header is ignored.
"""

from __future__ import annotations

import structlog

from worker.errors import Forbidden, ReplyToRefused
from worker.messages import EmbeddingRequest, LLMRequest
from worker.settings import CallersSettings

log = structlog.get_logger("worker.identity")
ANY = "*"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
REPLAY_CALLER = "x-replay-caller"  # the header a replay names the original caller in
MAX_USER_CHARS = 255  # RabbitMQ's limit on a user name (a shortstr)


class Callers:
    def __init__(self, settings: CallersSettings):
        self.settings = settings

    @property
    def enforced(self) -> bool:
        return self.settings.mode == "enforce"

    def announce(self) -> None:
        """At start-up: say loudly when identity is not enforced."""
        if not self.enforced:
            log.warning(
                "identity.not_enforced",
                note="callers.yaml mode: development: ANY publisher may act as ANY agent and name ANY "
                "model; never run this against a shared broker (set mode: enforce)",
            )

    def admit(
        self,
        user_id: str | None,
        request: LLMRequest | EmbeddingRequest,
        reply_to: str | None = None,
        replay_caller: object = None,
    ) -> str:
        """The caller's broker user ("" when not given, development mode only); raises
        :class:`Forbidden` naming what was refused. ``replay_caller``: the ``x-replay-caller``
        header, taken as the caller when ``user_id`` is a replayer (any publisher in development
        mode), ignored otherwise."""
        # "" (the request came with no user_id) is honoured only where anonymity is: development.
        named = isinstance(replay_caller, str) and len(replay_caller) <= MAX_USER_CHARS
        if named and (not self.enforced or (replay_caller and user_id in self.settings.replayers)):
            user_id = str(replay_caller)
        if not self.enforced:
            return user_id or ""
        if not user_id:
            raise Forbidden(
                "the request carries no AMQP user_id: publish with user_id set to your broker user "
                "(LLMClient does)"
            )
        grant = self.settings.users.get(user_id)
        if grant is None:
            raise Forbidden(
                f"broker user {user_id!r} is not a caller: add it to callers.yaml (users.{user_id})"
            )
        if ANY not in grant.agents and request.agent not in grant.agents:
            raise Forbidden(
                f"broker user {user_id!r} may not act as agent {request.agent!r}: "
                f"grant it in callers.yaml (users.{user_id}.agents)"
            )
        if request.model is not None and ANY not in grant.models and request.model not in grant.models:
            raise Forbidden(
                f"broker user {user_id!r} may not name model {request.model!r}: leave model out "
                f"or grant it in callers.yaml (users.{user_id}.models)"
            )
        self._check_reply_to(user_id, reply_to)
        return user_id

    def _check_reply_to(self, user_id: str, reply_to: str | None) -> None:
        """Raise :class:`ReplyToRefused` unless ``reply_to`` is Direct Reply-To, a queue of the
        caller's prefix, or absent (the results exchange, guarded by topic permissions)."""
        if reply_to is None or reply_to.startswith(DIRECT_REPLY_TO):
            return
        own = self.settings.reply_queue_prefix.format(user=user_id)
        if not reply_to.startswith(own):
            raise ReplyToRefused(
                f"reply_to {reply_to[:200]!r} is not a queue of broker user {user_id!r}: use Direct "
                f"Reply-To ({DIRECT_REPLY_TO}) or a queue named {own}* (LLMClient does)"
            )
