"""Callers are who the broker says they are (issue #15): a private RabbitMQ with agent users,
the worker reading each delivery's validated AMQP user_id against callers.yaml."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import aio_pika
import pytest
import yaml
from pydantic import SecretStr
from structlog.testing import capture_logs

from tests.support.bodies import request_body
from tests.support.http import Scrape, http_get
from tests.support.ledger import day_state
from tests.support.paths import ROOT
from tests.support.peers import RawPeer, raw_peer
from tests.support.queues import depth_at_least, drain_queue
from tests.support.waits import eventually
from worker.boundary.identity import Callers
from worker.client import LLMClient
from worker.deadletters import DeadLetters
from worker.messages import LLMRequest, LLMResult, Status
from worker.settings import CallersSettings, load_settings

GRANTS = {
    "mode": "enforce",
    "users": {
        "agent-writer": {"agents": ["writer"], "models": ["backup"]},
        "agent-critic": {"agents": ["critic"]},
    },
}


@pytest.fixture(scope="module")
def agents_rabbit(rabbit):
    """The module's private broker, with one user per agent (guest is the worker's)."""
    for user in ("agent-writer", "agent-critic"):
        rabbit.ctl("add_user", user, f"{user}-pw")
        rabbit.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    return rabbit


def as_user(rabbit, user: str) -> str:
    return rabbit.url.replace("guest:guest", f"{user}:{user}-pw")


@pytest.fixture
def settings(config, agents_rabbit):
    folder = config(amqp=agents_rabbit.url)
    (folder / "callers.yaml").write_text(yaml.safe_dump({"callers": GRANTS}))
    return load_settings(folder, environ={})


async def ask(rabbit, settings, user: str, **fields) -> LLMResult:
    async with LLMClient(as_user(rabbit, user), request_queue=settings.bus.request_queue) as llm:
        return await llm.complete("hello", use_cache=False, **fields)


async def publish_raw(url: str, queue: str, body: dict, **properties) -> LLMResult:
    """Publish as the URL's user with exactly ``properties`` (no user_id unless given); the reply."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(f"t.reply.{uuid.uuid4().hex}", exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(body).encode(), reply_to=replies.name, **properties),
            routing_key=queue,
        )
        async with replies.iterator(timeout=20) as inbox:
            async for message in inbox:
                await message.ack()
                return LLMResult.model_validate_json(message.body)
    raise AssertionError("no reply")


async def test_an_agent_acting_as_itself_is_served_and_the_client_sets_user_id(
    agents_rabbit, settings, start_worker, fake
):
    async with start_worker(settings):
        result = await ask(agents_rabbit, settings, "agent-writer", agent="writer")
        granted_model = await ask(agents_rabbit, settings, "agent-writer", agent="writer", model="backup")
    assert result.status is Status.ok and result.model == "m-writer"
    assert granted_model.status is Status.ok and granted_model.model == "backup"


async def test_what_a_caller_may_not_do_is_forbidden_named_counted_and_never_charged(
    agents_rabbit, settings, start_worker, fake
):
    queue = settings.bus.request_queue
    async with start_worker(settings) as worker:
        as_other = await ask(agents_rabbit, settings, "agent-critic", agent="writer")
        other_model = await ask(agents_rabbit, settings, "agent-critic", agent="critic", model="backup")
        no_user_id = await publish_raw(as_user(agents_rabbit, "agent-writer"), queue, request_body("x"))
        not_a_caller = await publish_raw(agents_rabbit.url, queue, request_body("x"), user_id="guest")
        _, text = await http_get(f"http://127.0.0.1:{worker.http_port}/metrics")

    messages = {
        "as_other": "broker user 'agent-critic' may not act as agent 'writer': grant it in callers.yaml",
        "other_model": "broker user 'agent-critic' may not name model 'backup'",
        "no_user_id": "the request carries no AMQP user_id: publish with user_id set to your broker user",
        "not_a_caller": "broker user 'guest' is not a caller: add it to callers.yaml (users.guest)",
    }
    results = dict(
        as_other=as_other, other_model=other_model, no_user_id=no_user_id, not_a_caller=not_a_caller
    )
    for name, result in results.items():
        assert result.status is Status.forbidden, name
        assert result.error is not None and result.error.type == "Forbidden" and not result.error.retryable
        assert result.error.message.startswith(messages[name]), result.error.message
        assert result.content is None and result.cost_usd == 0
    assert fake.total_calls() == 0  # never sent to a provider
    day = await day_state(settings)
    assert day.calls == 0 and day.reserved_usd == 0  # never charged, nothing held
    m = Scrape(text)
    forbidden = sum(
        m.value("llm_worker_requests_total", agent=a, model="none", status="forbidden")
        for a in ("writer", "critic")
    )
    assert forbidden == 4


async def test_the_broker_refuses_a_forged_user_id(agents_rabbit, settings, start_worker, fake):
    # agent-critic claims to be agent-writer: RabbitMQ itself refuses the publish (validated
    # user-ID), so the worker never sees the message.
    connection = await aio_pika.connect(as_user(agents_rabbit, "agent-critic"))
    async with start_worker(settings), connection:
        channel = await connection.channel(publisher_confirms=True)
        forged = aio_pika.Message(
            json.dumps(request_body("spend writer's budget")).encode(), user_id="agent-writer"
        )
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed) as refused:
            await channel.default_exchange.publish(forged, routing_key=settings.bus.request_queue)
    assert "user_id property set to 'agent-writer' but authenticated user was 'agent-critic'" in str(
        refused.value
    )
    assert fake.total_calls() == 0


def test_development_mode_says_so_loudly_and_enforces_nothing():
    callers = Callers(CallersSettings(mode="development"))
    with capture_logs() as logs:
        callers.announce()
    [line] = logs
    assert line["log_level"] == "warning" and line["event"] == "identity.not_enforced"
    assert "ANY publisher may act as ANY agent" in line["note"]
    request = LLMRequest.model_validate(request_body("x", agent="writer", model="anything"))
    assert callers.admit(None, request) == ""  # no user_id, any agent, any model


def test_the_production_config_enforces_and_only_the_offline_profile_does_not():
    shipped = yaml.safe_load((ROOT / "config" / "callers.yaml").read_text())["callers"]
    offline = yaml.safe_load((ROOT / "config" / "offline" / "callers.yaml").read_text())["callers"]
    assert CallersSettings.model_validate(shipped).mode == "enforce"
    assert CallersSettings.model_validate(offline).mode == "development"
    agents = yaml.safe_load((ROOT / "config" / "llm.yaml").read_text())["llm"]["agent_models"]
    granted = {a for grant in shipped["users"].values() for a in grant["agents"] if a != "*"}
    assert granted == set(agents)  # every configured agent has a broker user


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_to_the_caller_does_not_own_is_refused_and_dead_lettered(
    agents_rabbit, settings, start_worker, fake, stream
):
    # agent-critic aims its answer at agent-writer's reply queue, with a correlation_id writer
    # waits on, and at the worker's own queues: nothing is published there, each is dead-lettered.
    writer_queue = "llm.reply.agent-writer.victim"
    bus = settings.bus
    critic = as_user(agents_rabbit, "agent-critic")
    writer = await aio_pika.connect(as_user(agents_rabbit, "agent-writer"))
    async with start_worker(settings), writer, await aio_pika.connect(critic) as attacker:
        writer_channel = await writer.channel()
        await writer_channel.declare_queue(writer_queue, exclusive=True)
        channel = await attacker.channel(publisher_confirms=True)
        targets = [writer_queue, bus.request_queue, bus.dead_letter_queue]
        for i, target in enumerate(targets):
            body = request_body("hijack", agent="critic", request_id=f"hijack-{i}", use_cache=False)
            body["stream"] = stream  # not one chunk either (issue #18)
            message = aio_pika.Message(
                json.dumps(body).encode(),
                user_id="agent-critic",
                reply_to=target,
                correlation_id="writer-waits",
            )
            await channel.default_exchange.publish(message, routing_key=bus.request_queue)
        dead = await eventually_dead_letters(agents_rabbit.url, bus.dead_letter_queue, len(targets))
        victim = await writer_channel.declare_queue(writer_queue, passive=True)
        assert victim.declaration_result.message_count == 0  # writer received nothing

    assert sorted(m.headers["x-dlq-request-id"] for m in dead) == ["hijack-0", "hijack-1", "hijack-2"]
    assert {m.headers["x-dlq-reason"] for m in dead} == {"ReplyToRefused"}
    assert "is not a queue of broker user 'agent-critic'" in str(dead[0].headers["x-dlq-message"])
    assert fake.total_calls() == 0


async def test_direct_reply_to_is_answered(agents_rabbit, settings, start_worker, fake):
    async with start_worker(settings), await aio_pika.connect(as_user(agents_rabbit, "agent-writer")) as conn:
        channel = await conn.channel()
        direct = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            replies.put_nowait(message.body)

        await direct.consume(on_reply, no_ack=True)
        body = request_body("direct", agent="writer", use_cache=False)
        message = aio_pika.Message(
            json.dumps(body).encode(), user_id="agent-writer", reply_to="amq.rabbitmq.reply-to"
        )
        await channel.default_exchange.publish(message, routing_key=settings.bus.request_queue)
        result = LLMResult.model_validate_json(await asyncio.wait_for(replies.get(), 20))
    assert result.status is Status.ok and result.content == "[m-writer] direct"


async def eventually_dead_letters(url: str, queue: str, count: int) -> list:
    got: list = []
    for _ in range(40):
        got += await drain_queue(url, queue, idle_s=0.5)
        if len(got) >= count:
            return got
        await asyncio.sleep(0.25)
    raise AssertionError(f"{len(got)} of {count} dead letters")


def test_a_broker_user_name_with_a_dot_is_a_config_error():
    # "a" would own the reply prefix llm.reply.a. and with it every queue of user "a.b".
    with pytest.raises(ValueError, match=re.escape("user 'a.b': a broker user name here may not hold '.'")):
        CallersSettings.model_validate({"users": {"a.b": {"agents": ["writer"]}}})


# -- replays: served as the original caller, only when the operator replays them --------------

REPLAY_GRANTS = {
    **GRANTS,
    "users": {**GRANTS["users"], "operator": {"agents": ["*"], "models": ["*"]}},
    "workers": ["guest"],  # the worker's broker user in this module
    "replayers": ["operator"],
}


@pytest.fixture
def replay_settings(config, agents_rabbit):
    if "operator" not in agents_rabbit.ctl("list_users"):
        agents_rabbit.ctl("add_user", "operator", "operator-pw")
        agents_rabbit.ctl("set_permissions", "-p", "/", "operator", ".*", ".*", ".*")
    folder = config(amqp=agents_rabbit.url)
    (folder / "callers.yaml").write_text(yaml.safe_dump({"callers": REPLAY_GRANTS}))
    return load_settings(folder, environ={})


def operator_settings(settings):
    """The operator's view of the same config: its own broker user, as `dlq replay` runs."""
    url = SecretStr(as_user_url(settings, "operator"))
    bus = settings.bus.model_copy(update={"url": url, "urls": [url]})
    return settings.model_copy(update={"bus": bus})


def as_user_url(settings, user: str) -> str:
    return settings.bus.url.get_secret_value().replace("guest:guest", f"{user}:{user}-pw")


async def reply(peer: RawPeer, n: int) -> LLMResult:
    """The ``n``th reply the peer has had (from 1), once it is there."""
    await peer.wait_replies(n)
    return peer.results()[n - 1]


async def test_a_replayed_dead_letter_is_served_as_its_original_caller(
    agents_rabbit, replay_settings, start_worker, fake, names
):
    """agent-writer's request fails (its provider is down) and is dead-lettered; the operator
    replays it once the provider is back: it is served as agent-writer (writer's grant, writer's
    reply queue, writer's stored answer), not as the operator, whose user only published it."""
    settings, port = replay_settings, fake.port
    writer_url = as_user(agents_rabbit, "agent-writer")
    async with (
        start_worker(settings),
        raw_peer(writer_url, settings.bus.request_queue, user="agent-writer") as writer,
    ):
        await fake.stop()
        body = request_body("replay me", use_cache=False)
        await writer.publish(body)
        failed = await reply(writer, 1)
        await fake.start(port)
        (letter,) = await drain_queue(settings.bus.url.get_secret_value(), names.dead_letter_queue, keep=True)
        assert letter.user_id == "guest" and letter.headers["x-dlq-user-id"] == "agent-writer"
        async with DeadLetters.open(operator_settings(settings)) as dlq:
            report = await dlq.replay()
        replayed = await reply(writer, 2)
        # The same request again, as the same caller: the stored answer, not another call.
        await writer.publish(body)
        again = await reply(writer, 3)
    assert failed.status is Status.failed
    assert len(report.replayed) == 1 and not report.failed
    assert replayed.status is Status.ok and replayed.agent == "writer" and replayed.content
    assert again.status is Status.ok and again.content == replayed.content
    assert fake.total_calls() == 1


async def test_a_letter_someone_put_in_the_queue_is_replayed_as_its_publisher(
    agents_rabbit, replay_settings, start_worker, fake, names
):
    """agent-critic drops a writer request into the dead-letter queue claiming, in the headers a
    worker's dead letter has, to be from agent-writer; or sends x-replay-caller itself. Neither
    makes it writer: its letter is replayed as agent-critic, and critic may not act as writer."""
    settings = replay_settings
    critic_url = as_user(agents_rabbit, "agent-critic")
    claims = {
        "x-dlq-user-id": "agent-writer",
        "x-dlq-reason": "ProviderError",
        "x-replay-caller": "agent-writer",
    }
    async with (
        start_worker(settings),
        raw_peer(critic_url, settings.bus.request_queue, user="agent-critic") as critic,
    ):
        await critic.publish(
            request_body("as writer, via the DLQ"), headers=claims, to=names.dead_letter_queue
        )
        async with DeadLetters.open(operator_settings(settings)) as dlq:
            await dlq.replay()
        via_replay = await reply(critic, 1)
        await critic.publish(request_body("as writer, directly"), headers=claims)
        direct = await reply(critic, 2)
        # No user_id at all, only the claim: replayed as the operator, whose reply queue it is not.
        anonymous = request_body("as writer, unsigned")
        claim = {"x-replay-caller": "agent-writer"}
        await critic.publish(anonymous, headers=claim, to=names.dead_letter_queue, signed=False)
        async with DeadLetters.open(operator_settings(settings)) as dlq:
            await dlq.replay()
        await eventually(
            lambda: depth_at_least(settings.bus.url.get_secret_value(), names.dead_letter_queue, 1),
            what="the unsigned letter dead-lettered again",
        )
        (again,) = await drain_queue(settings.bus.url.get_secret_value(), names.dead_letter_queue)
    assert (
        again.headers["x-dlq-reason"] == "ReplyToRefused" and again.correlation_id == anonymous["request_id"]
    )
    assert "broker user 'operator'" in again.headers["x-dlq-message"]
    assert len(critic.replies) == 2  # no answer to the unsigned one
    for result in (via_replay, direct):
        assert result.status is Status.forbidden, result
        assert result.error is not None
        assert result.error.message.startswith("broker user 'agent-critic' may not act as agent 'writer'")
    assert fake.total_calls() == 0


def test_replayers_need_grants_and_named_workers():
    with pytest.raises(ValueError, match=r"replayers \['ops'\]: each must also be a user here"):
        CallersSettings.model_validate({**REPLAY_GRANTS, "replayers": ["ops"]})
    with pytest.raises(ValueError, match="replayers is set but workers is not"):
        CallersSettings.model_validate({**REPLAY_GRANTS, "workers": []})


@pytest.mark.parametrize(
    ("header", "publisher", "served_as"),
    [
        ("agent-writer", "operator", "agent-writer"),
        ("agent-writer", "agent-critic", "agent-critic"),  # not a replayer: ignored
        (b"agent-writer", "operator", "operator"),  # not a string: ignored
        (7, "operator", "operator"),
        ("", "operator", "operator"),
        ("x" * 256, "operator", "operator"),  # longer than any broker user name
    ],
)
def test_only_a_replayer_names_the_caller(header, publisher, served_as):
    callers = Callers(CallersSettings.model_validate(REPLAY_GRANTS))
    request = LLMRequest.model_validate(
        request_body("x", agent="writer" if served_as != "agent-critic" else "critic")
    )
    assert callers.admit(publisher, request, None, header) == served_as


def test_in_development_mode_a_replay_keeps_any_caller_even_none():
    """The offline profile trusts every publisher; a replay keeps whoever sent the request, ""
    for a request that came without user_id, so the replay finds the answer stored for it."""
    callers = Callers(CallersSettings(mode="development"))
    request = LLMRequest.model_validate(request_body("x"))
    assert callers.admit("guest", request, None, "") == ""
    assert callers.admit("guest", request, None, "agent-x") == "agent-x"
    assert callers.admit("guest", request, None, None) == "guest"
