"""Private distributed services for the cluster fault tests (issue #20): a three-node RabbitMQ
cluster and a Redis primary with a replica watched by three Sentinels, all on this machine.

Each RabbitMQ node is a :class:`PrivateRabbit` (its own node name, AMQP and distribution ports,
data, log and config files, run as the ``rabbitmq`` user so that all share its Erlang cookie),
then joined to the first with ``rabbitmqctl join_cluster``. The shared broker on 5672 is never
joined or touched: its queues would then depend on nodes these tests stop.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.support.ports import free_port, wait_for_port
from tests.support.services import PrivateRabbit, PrivateRedis
from tests.support.waits import eventually


class RabbitCluster:
    def __init__(self, size: int = 3) -> None:
        self.nodes = [PrivateRabbit() for _ in range(size)]

    async def start(self) -> RabbitCluster:
        await asyncio.gather(*(node.start() for node in self.nodes))
        seed = self.nodes[0]
        for node in self.nodes[1:]:  # one at a time: each join is a schema change on the seed
            await asyncio.to_thread(node.ctl, "stop_app")
            await asyncio.to_thread(node.ctl, "join_cluster", seed.node)
            await asyncio.to_thread(node.ctl, "start_app")
        running = await asyncio.to_thread(self.running_nodes)
        if running != {n.node for n in self.nodes}:
            raise RuntimeError(f"cluster formed with {sorted(running)} only")
        return self

    def running_nodes(self, via: PrivateRabbit | None = None) -> set[str]:
        status = json.loads((via or self.nodes[0]).ctl("cluster_status", "--formatter", "json"))
        return set(status["running_nodes"])

    def node_named(self, name: str) -> PrivateRabbit:
        return next(n for n in self.nodes if n.node == name)

    def by_port(self, port: int) -> PrivateRabbit:
        return next(n for n in self.nodes if n.port == port)

    def queue(self, name: str, via: PrivateRabbit) -> dict[str, object]:
        """A quorum queue's leader and members (``rabbitmqctl list_queues``) as one node sees them."""
        rows = json.loads(
            via.ctl("list_queues", "name", "type", "leader", "members", "online", "--formatter", "json")
        )
        return next(row for row in rows if row["name"] == name)

    async def destroy(self) -> None:
        await asyncio.gather(*(node.destroy() for node in self.nodes), return_exceptions=True)


class SentinelSet:
    """A Redis primary, one replica and three Sentinels watching them as ``service``.

    Quick to fail over: a primary unanswered for ``down_after_ms`` is down, and two Sentinels
    of three agreeing is a quorum.
    """

    service = "llmw"

    def __init__(self, *, down_after_ms: int = 1000) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("needs redis-server on PATH")
        self.primary = PrivateRedis()
        self.replica = PrivateRedis()
        self.down_after_ms = down_after_ms
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.folder = Path(tempfile.mkdtemp(prefix="sentinel-"))
        self.sentinels: list[asyncio.subprocess.Process] = []

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    async def start(self) -> SentinelSet:
        await self.primary.start()
        await self.replica.start()
        replica = aioredis.Redis(port=self.replica.port)
        async with replica:
            await replica.replicaof("127.0.0.1", self.primary.port)
            await eventually(lambda: _link_up(replica), what="the replica in sync")
        for i, port in enumerate(self.sentinel_ports):
            conf = self.folder / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.folder}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.sentinels.append(await _spawn("redis-server", str(conf), "--sentinel"))
        for port in self.sentinel_ports:
            await wait_for_port(port, up=True, timeout_s=20)
        # Every Sentinel has found the other two and the replica, so a failover can be voted.
        await eventually(self._all_acquainted, what="three Sentinels that know each other and the replica")
        return self

    async def _all_acquainted(self) -> bool:
        for port in self.sentinel_ports:
            sentinel = aioredis.Redis(port=port, decode_responses=True)
            async with sentinel:
                master = await sentinel.sentinel_master(self.service)
                if int(master["num-other-sentinels"]) < 2 or int(master["num-slaves"]) < 1:
                    return False
        return True

    async def primary_port(self) -> int:
        sentinel = aioredis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        async with sentinel:
            _, port = await sentinel.sentinel_get_master_addr_by_name(self.service)
        return int(port)

    async def destroy(self) -> None:
        for proc in self.sentinels:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await self.primary.destroy()
        await self.replica.destroy()
        shutil.rmtree(self.folder, ignore_errors=True)


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )


async def _link_up(replica: aioredis.Redis) -> bool:
    info = await replica.info("replication")
    return info.get("master_link_status") == "up"


class RedisClusterSet:
    """Three Redis Cluster primaries (no replicas), slots spread by ``redis-cli --cluster create``."""

    def __init__(self, size: int = 3) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            pytest.skip("needs redis-server and redis-cli on PATH")
        self.ports = [free_port() for _ in range(size)]
        self.folder = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> RedisClusterSet:
        for port in self.ports:
            args = f"--port {port} --bind 127.0.0.1 --appendonly no --cluster-enabled yes"
            args += f" --dir {self.folder} --cluster-config-file nodes-{port}.conf"
            self.procs.append(await _spawn("redis-server", *args.split(), "--save", ""))
        for port in self.ports:
            await wait_for_port(port, up=True, timeout_s=20)
        create = await asyncio.create_subprocess_exec(
            "redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
            "--cluster-replicas", "0", "--cluster-yes",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(create.communicate(), 60)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.decode()[-500:]}")

        async def ok() -> bool:
            node = aioredis.Redis(port=self.ports[0], decode_responses=True)
            async with node:
                info = await node.execute_command("CLUSTER", "INFO")
            return "cluster_state:ok" in str(info)

        await eventually(ok, what="cluster_state:ok")
        return self

    async def destroy(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
