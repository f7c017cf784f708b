"""The pick of a deployment within a model group and its cooldowns (worker.routing, issue #21):
litellm's Router's behaviour as the worker used it, without the Router.

The unit tests drive :class:`Routes` with a clock of their own; the last ones run a worker against
the real broker and Redis."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from tests.support.config import deployment
from worker.errors import ProviderError
from worker.messages import Status
from worker.routing import Routes, Target


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def routes(*params: dict[str, Any], group: str = "g", clock: Clock | None = None) -> Routes:
    targets = [Target(f"{group}#{i}", group, {"model": f"openai/m{i}", **p}) for i, p in enumerate(params)]
    return Routes(targets, cooldown_s=30, clock=clock or Clock())


def error(status: int | None, kind: str = "ServerError") -> ProviderError:
    return ProviderError(kind, f"status {status}", retryable=True, status_code=status)


def picks(r: Routes, n: int = 4000) -> Counter[str]:
    random.seed(7)
    return Counter(r.pick("g").id for _ in range(n))


def test_the_pick_is_weighted_by_weight_then_rpm_then_tpm():
    assert picks(routes({"weight": 3}, {"weight": 1}))["g#0"] == pytest.approx(3000, rel=0.05)
    assert picks(routes({"rpm": 100}, {"rpm": 300}))["g#1"] == pytest.approx(3000, rel=0.05)
    assert picks(routes({"tpm": 1000}, {"tpm": 1000}))["g#0"] == pytest.approx(2000, rel=0.06)
    unweighted = picks(routes({}, {}, {}))
    assert set(unweighted) == {"g#0", "g#1", "g#2"} and min(unweighted.values()) > 1200


@pytest.mark.parametrize("bad", [0, -5, "9", None, float("nan")])
def test_a_weight_that_is_not_a_positive_number_gets_no_share(bad):
    counted = picks(routes({"weight": 1}, {"weight": bad}), n=500)
    assert counted == {"g#0": 500}


def test_only_the_lowest_order_is_picked_until_it_is_cooled_down():
    clock = Clock()
    r = routes({"order": 2}, {"order": 1}, {}, clock=clock)
    assert picks(r, n=200) == {"g#1": 200}  # a deployment without an order is left out, as litellm does
    r.failed(r.pick("g"), error(404, "NotFound"))
    assert picks(r, n=200) == {"g#0": 200}


def test_401_and_404_cool_down_at_once_even_a_groups_only_deployment():
    for status in (401, 404):
        clock = Clock()
        r = routes({}, clock=clock)
        r.failed(r.pick("g"), error(status))
        with pytest.raises(ProviderError) as raised:
            r.pick("g")
        assert raised.value.kind == "NoHealthyDeployment" and raised.value.retryable
        assert raised.value.retry_after_s == pytest.approx(30)
        assert "'g'" in str(raised.value) and f"status {status}" in str(raised.value)
        clock.now += 30
        assert r.pick("g").id == "g#0"  # back after the cooldown


def test_429_cools_down_a_deployment_only_when_its_group_has_another():
    single, shared = routes({}), routes({"order": 1}, {"order": 2})
    single.failed(single.pick("g"), error(429, "RateLimited"))
    shared.failed(shared.pick("g"), error(429, "RateLimited"))
    assert single.pick("g").id == "g#0"
    assert picks(shared, n=100) == {"g#1": 100}


@pytest.mark.parametrize(
    "failure",
    [
        error(400, "BadRequest"),  # an agent's malformed request must not knock a deployment out for all
        error(422, "BadRequest"),
        error(403, "PermissionDenied"),
        error(None, "ConnectionError"),
        error(503, "ConnectionError"),
        error(None, "ServerError"),
    ],
)
def test_what_never_cools_a_deployment_down(failure):
    r = routes({"order": 1}, {"order": 2})
    for _ in range(50):
        r.failed(r.pick("g"), failure)
    assert r.pick("g").id == "g#0"


def test_more_than_half_failing_in_a_minute_cools_a_shared_deployment_after_five_calls():
    clock = Clock()
    r = routes({"order": 1}, {"order": 2}, clock=clock)
    first = r.pick("g")
    r.answered(first)
    r.answered(first)
    r.failed(first, error(500))
    r.failed(first, error(500))
    assert r.pick("g") is first  # 2 of 4 failed: too few calls, and not more than half
    r.failed(first, error(500))  # 3 of 5
    assert r.pick("g").id == "g#1"


def test_the_failure_count_starts_again_each_minute():
    clock = Clock()
    clock.now = 60 * 100.0
    r = routes({"order": 1}, {"order": 2}, clock=clock)
    first = r.pick("g")
    for _ in range(4):
        r.failed(first, error(500))
    clock.now += 60
    r.failed(first, error(500))  # the fifth failure, but the first of this minute
    assert r.pick("g") is first


def test_a_groups_only_deployment_is_cooled_by_server_errors_only_after_1000_in_a_minute():
    r = routes({})
    only = r.pick("g")
    for _ in range(999):
        r.failed(only, error(500))
    assert r.pick("g") is only
    r.failed(only, error(500))
    with pytest.raises(ProviderError, match="cooled down"):
        r.pick("g")


def test_a_pinned_deployment_is_called_even_when_cooled_down():
    """The throttle picked it and holds its rate-limit room (a throttled 429 cools it for every
    replica in Redis instead)."""
    r = routes({"order": 1}, {"order": 2})
    r.failed(r.pick("g"), error(404))
    assert r.pick("g", pinned="g#0").id == "g#0"
    assert r.pick("g").id == "g#1"


def test_cooldowns_are_per_group():
    targets = [Target("a#0", "a", {"model": "openai/x"}), Target("b#1", "b", {"model": "openai/x"})]
    r = Routes(targets, clock=Clock())
    r.failed(r.pick("a"), error(401))
    assert r.pick("b").id == "b#1"
    assert r.groups == ["a", "b"] and r.first("b").id == "b#1"


# -- through a worker, against the real broker and Redis --------------------------------------


def ordered(
    name: str, fake_model: str, base_url: str, order: int, price: tuple[float, float]
) -> dict[str, Any]:
    entry = deployment(name, fake_model, base_url, price=price)
    entry["litellm_params"]["order"] = order
    return entry


async def six_calls(
    make_settings: Any, start_worker: Any, client: Any, fake: Any, first: str, ok_price: tuple[float, float]
) -> list[Any]:
    """Six requests, one after another, to the group ``primary``: the fake's ``first`` behaviour at
    order 1 (priced 1e-6/2e-6), ``ok`` at order 2."""
    settings = make_settings(
        models=[
            ordered("primary", first, fake.base_url, 1, (1e-6, 2e-6)),
            ordered("primary", "ok", fake.base_url, 2, ok_price),
        ]
    )
    async with start_worker(settings):
        return [await client.complete(f"call {i}", agent="writer", use_cache=False) for i in range(6)]


async def test_a_429_moves_a_groups_traffic_to_its_other_deployment_priced_as_that_one(
    make_settings, start_worker, client, fake
):
    results = await six_calls(make_settings, start_worker, client, fake, "e429", (3e-6, 5e-6))

    assert all(r.status is Status.ok and r.model == "primary" for r in results)
    assert fake.calls["e429"] == 1  # cooled down after its first 429: never called again
    assert fake.calls["ok"] == 6
    assert results[0].attempts == 2 and all(r.attempts == 1 for r in results[1:])
    # litellm's private flag that skips its success logging is litellm's, never the provider's
    assert not any("_is_litellm_internal_call" in str(seen) for seen in fake.requests)
    for r in results:  # the answering deployment's price, not the group's dearest or the first's
        assert r.cost_usd == pytest.approx(r.tokens.prompt * 3e-6 + r.tokens.completion * 5e-6)


async def test_an_agents_bad_requests_do_not_take_a_shared_deployment_away_from_the_others(
    make_settings, start_worker, client, fake
):
    """Six 400s in a row (100 % of the minute's calls) leave the deployment in the rotation."""
    results = await six_calls(make_settings, start_worker, client, fake, "e400", (1e-6, 2e-6))

    assert all(r.error is not None and r.error.type == "BadRequest" for r in results)
    assert fake.calls["e400"] == 6 and fake.calls["ok"] == 0
