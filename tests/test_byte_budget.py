"""The request memory's rules (mediatag_common.byte_budget): calls wait for room in order,
the callers waiting take turns, services first, and the places to wait are shared as watch
streams are. No server: the budget alone, on the test's event loop."""

from __future__ import annotations

import asyncio

import pytest

from mediatag_common.byte_budget import ByteBudget, TooManyWaiting
from mediatag_common.caller_slots import SlotsFull
from mediatag_common.callers import Caller
from tests.conftest import PATIENCE

ALICE = Caller("alice")
BOB = Caller("bob")
INGEST = Caller("ingest-analysis", service=True)


class Admissions:
    """Calls that wait for room in a budget, and the order they were admitted in."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.order: list[str] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def wait(self, name: str, caller: Caller, amount: int = 100) -> None:
        """Start a call that waits, and return once it waits (or was refused)."""

        async def take() -> None:
            await self.budget.acquire(amount, caller)
            self.order.append(name)

        self.tasks[name] = asyncio.create_task(take())
        # One step of the loop: the task either holds its place in the queue now or failed.
        await asyncio.sleep(0)

    async def give_back(self, times: int, amount: int = 100) -> None:
        """Give ``amount`` back ``times``, letting the call admitted each time run first."""
        for _ in range(times):
            self.budget.release(amount)
            await asyncio.sleep(0)

    async def admitted(self, *names: str) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(self.tasks[name] for name in names)), timeout=PATIENCE
        )


async def test_calls_are_admitted_in_order_and_a_cancelled_wait_is_forgotten() -> None:
    budget = ByteBudget(100, max_waiters=3, max_waiters_per_caller=3)
    await budget.acquire(100, ALICE)  # full
    calls = Admissions(budget)
    await calls.wait("first", ALICE, 60)
    await calls.wait("gone", ALICE, 10)
    await calls.wait("last", BOB, 40)
    calls.tasks["gone"].cancel()
    budget.release(100)
    await calls.admitted("first", "last")
    with pytest.raises(asyncio.CancelledError):
        await calls.tasks["gone"]
    assert calls.order == ["first", "last"]
    assert budget.used == 100
    assert not budget.waiting
    # One amount larger than the whole budget is still admitted when nothing else is held.
    budget.release(100)
    await asyncio.wait_for(budget.acquire(500, ALICE), timeout=PATIENCE)
    assert budget.used == 500


async def test_waiting_callers_take_turns_one_call_each() -> None:
    # Room for one call at a time: each is admitted when the one before gives its room back.
    budget = ByteBudget(100, max_waiters=10)
    await budget.acquire(100, ALICE)
    calls = Admissions(budget)
    for number in range(3):
        await calls.wait(f"alice-{number}", ALICE)
    await calls.wait("bob-0", BOB)
    await calls.wait("bob-1", BOB)
    await calls.give_back(5)
    await calls.admitted(*calls.tasks)
    # Bob's calls came after all of Alice's and are not served after all of them.
    assert calls.order == ["alice-0", "bob-0", "alice-1", "bob-1", "alice-2"]


async def test_a_services_calls_are_admitted_before_the_clients() -> None:
    budget = ByteBudget(100, max_waiters=10)
    await budget.acquire(100, ALICE)
    calls = Admissions(budget)
    await calls.wait("alice", ALICE)
    await calls.wait("bob", BOB)
    await calls.wait("ingest-0", INGEST)
    await calls.wait("ingest-1", INGEST)
    await calls.give_back(4)
    await calls.admitted(*calls.tasks)
    assert calls.order == ["ingest-0", "ingest-1", "alice", "bob"]


async def test_one_caller_waits_in_at_most_its_share_of_the_places() -> None:
    budget = ByteBudget(100, max_waiters=4)  # a caller's share: half of them
    await budget.acquire(100, ALICE)
    calls = Admissions(budget)
    await calls.wait("alice-0", ALICE)
    await calls.wait("alice-1", ALICE)
    await calls.wait("alice-2", ALICE)
    refused = calls.tasks["alice-2"].exception()
    assert isinstance(refused, TooManyWaiting)
    assert (refused.bound, refused.limit) == (SlotsFull.CALLER, 2)

    # Others still wait, up to the clients' places; a service has places of its own.
    await calls.wait("bob-0", BOB)
    await calls.wait("bob-1", BOB)
    await calls.wait("carol", Caller("carol"))
    refused = calls.tasks["carol"].exception()
    assert isinstance(refused, TooManyWaiting)
    assert (refused.bound, refused.limit) == (SlotsFull.CLIENTS, 4)
    await calls.wait("ingest", INGEST)
    assert not calls.tasks["ingest"].done()

    # Each caller's place is given back once its call is admitted.
    await calls.give_back(2)
    await calls.admitted("ingest", "alice-0")
    await calls.wait("alice-3", ALICE)
    assert not calls.tasks["alice-3"].done()
    await calls.give_back(4)
    await calls.admitted("bob-0", "alice-1", "bob-1", "alice-3")
    assert calls.order == ["ingest", "alice-0", "bob-0", "alice-1", "bob-1", "alice-3"]


async def test_a_wait_cancelled_after_the_budget_passed_it_over_is_forgotten() -> None:
    # The waiter is cancelled, then room comes back before its task has run: the budget
    # passes the cancelled waiter over, and the task, running after, must not fail on it.
    budget = ByteBudget(100, max_waiters=4, max_waiters_per_caller=4)
    await budget.acquire(100, ALICE)
    calls = Admissions(budget)
    await calls.wait("gone", ALICE)
    await calls.wait("next", ALICE)
    calls.tasks["gone"].cancel()
    budget.release(100)
    with pytest.raises(asyncio.CancelledError):
        await calls.tasks["gone"]
    await calls.admitted("next")
    assert calls.order == ["next"]
    assert budget.used == 100
    assert not budget.waiting
    # Its place was given back: four callers' calls wait again.
    for number in range(4):
        await calls.wait(f"again-{number}", ALICE)
    assert not any(calls.tasks[f"again-{number}"].done() for number in range(4))
    for task in calls.tasks.values():
        task.cancel()


async def test_a_call_behind_a_cancelled_wait_that_did_not_fit_goes_at_once() -> None:
    budget = ByteBudget(100, max_waiters=4, max_waiters_per_caller=4)
    await budget.acquire(50, ALICE)  # held for as long as a slow upload takes
    calls = Admissions(budget)
    await calls.wait("large", BOB, 100)
    await calls.wait("small", ALICE, 40)
    assert not calls.tasks["small"].done()  # it fits, but waits its turn behind "large"
    calls.tasks["large"].cancel()
    with pytest.raises(asyncio.CancelledError):
        await calls.tasks["large"]
    # No bytes came back, and the call that fits is not kept waiting for them.
    await calls.admitted("small")
    assert budget.used == 90
    assert not budget.waiting
