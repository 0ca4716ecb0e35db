"""The job row cache's rules (api/job_cache.py), without a database: what it keeps, what a
notification drops, and that a read racing a change is not kept."""

import asyncio

from api.job_cache import JobRowCache


class Loads:
    """A stand-in for the database read: counts calls, answers the current row."""

    def __init__(self, row):
        self.row, self.calls = row, 0

    async def __call__(self):
        self.calls += 1
        return self.row


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_row_read_while_live_is_served_from_the_cache_until_a_notification_names_it():
    cache, load = JobRowCache(), Loads("v1")
    cache.set_live(True)

    async def scenario():
        assert await cache.read("job", "acme", load) == "v1"
        assert await cache.read("job", "acme", load) == "v1"
        assert load.calls == 1
        load.row = "v2"
        cache.forget("job")
        assert await cache.read("job", "acme", load) == "v2"
        assert load.calls == 2

    run(scenario())


def test_another_tenant_never_gets_a_cached_row():
    cache, load = JobRowCache(), Loads("row")
    cache.set_live(True)

    async def scenario():
        await cache.read("job", "acme", load)
        assert await cache.read("job", "other", load) is None

    run(scenario())


def test_nothing_is_kept_while_not_listening_and_losing_the_connection_empties_the_cache():
    cache, load = JobRowCache(), Loads("row")

    async def scenario():
        await cache.read("job", "acme", load)
        await cache.read("job", "acme", load)
        assert load.calls == 2  # never live: every read goes to the database
        cache.set_live(True)
        await cache.read("job", "acme", load)
        cache.set_live(False)
        await cache.read("job", "acme", load)
        assert load.calls == 4 and cache.rows == {}

    run(scenario())


def test_a_read_in_flight_when_a_notification_arrives_is_not_kept():
    cache = JobRowCache()
    cache.set_live(True)
    reading, notified = asyncio.Event(), asyncio.Event()

    async def slow_load():
        reading.set()
        await notified.wait()
        return "read before the change"

    async def scenario():
        read = asyncio.create_task(cache.read("job", "acme", slow_load))
        await reading.wait()
        cache.forget("job")  # the writer committed while the read was on its way
        notified.set()
        assert await read == "read before the change"
        assert "job" not in cache.rows

    run(scenario())


def test_missing_jobs_are_not_kept_and_the_cache_stays_bounded():
    cache = JobRowCache(size=3)
    cache.set_live(True)

    async def scenario():
        assert await cache.read("gone", "acme", Loads(None)) is None
        assert cache.rows == {}
        for i in range(10):
            await cache.read(f"job-{i}", "acme", Loads(i))
        assert len(cache.rows) <= 3

    run(scenario())
