"""Which publish a ``basic.return`` belongs to, when two replies share a request id.

aiormq matches a return to its publish by ``message_id``, and a reply's is its request id: a
reply and the reply to its duplicate, in flight together on the one publish channel, were each
told the other's fate (an answer to a gone queue logged ``replied``, its return unclaimed).
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika

from worker.bus import Bus
from worker.messages import LLMResult, Status


async def test_replies_sharing_a_request_id_are_each_told_their_own_fate(make_settings, amqp_url):
    bus = Bus(make_settings().bus, name="test-returns")
    await bus.connect()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        waiting = await channel.declare_queue(f"t.here.{uuid.uuid4().hex}", exclusive=True)
        for _ in range(5):  # the interleaving varies; each round must come out right
            result = LLMResult(request_id=uuid.uuid4().hex, agent="writer", status=Status.ok, content="x")
            gone, here = await asyncio.gather(
                bus.reply(result, reply_to=f"t.gone.{uuid.uuid4().hex}", correlation_id=None, headers={}),
                bus.reply(result, reply_to=waiting.name, correlation_id=None, headers={}),
            )
            assert (gone, here) == ("unroutable", "replied")
        assert bus._in_flight == {}  # nothing kept once the publishes are confirmed
    finally:
        await connection.close()
        await bus.close()
