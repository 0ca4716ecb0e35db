"""deploy/local/stack.py against the real Kafka and MinIO it starts.

Runs its own small stack (Kafka + MinIO only) in a temporary run dir on free ports, so it
neither needs nor disturbs the stack the rest of the suite uses.
"""

import signal
import time
import uuid

import pytest

from deploy.local.stack import Stack, StackError, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(
        tmp_path_factory.mktemp("stack-run"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        minio_port=free_port(),
        minio_console_port=free_port(),
        api_port=free_port(),
        kafka_heap="256m",  # this stack runs beside the suite's own one
    )
    yield s
    s.down()


def _kafka_roundtrip(stack: Stack, topic: str, payload: bytes | None) -> list[bytes]:
    """Produce `payload` (if given) to `topic`, then read the topic from the start."""
    from confluent_kafka import Consumer, Producer

    if payload is not None:
        p = Producer({"bootstrap.servers": stack.kafka_bootstrap, "enable.idempotence": True})
        p.produce(topic, key=b"k", value=payload)
        assert p.flush(10) == 0
    c = Consumer({
        "bootstrap.servers": stack.kafka_bootstrap,
        "group.id": f"test-{uuid.uuid4().hex}",  # a fresh group reads from the beginning
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    try:
        c.subscribe([topic])
        got: list[bytes] = []
        deadline = time.monotonic() + 60  # generous: a busy 2-core CI box is slow to join a group
        while not got and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
        return got
    finally:
        c.close()


def _minio(stack: Stack):
    from minio import Minio

    return Minio(stack.s3_endpoint, access_key=stack.s3_access_key,
                 secret_key=stack.s3_secret_key, secure=False)


def test_env_points_at_the_stack(stack):
    env = stack.env()
    assert env["RETRAIN_KAFKA_BOOTSTRAP"] == f"127.0.0.1:{stack.kafka_port}"
    assert env["RETRAIN_S3_ENDPOINT"] == f"127.0.0.1:{stack.minio_port}"
    assert env["RETRAIN_API_PORT"] == str(stack.api_port)
    assert env["RETRAIN_DATABASE_URL"] == f"sqlite:///{stack.run_dir}/retrain.db"  # the embedded default
    assert env["RETRAIN_WORKDIR"] == str(stack.run_dir / "work")
    assert env["RETRAIN_TRAINER_PYTHON"].endswith(".venv-trainer/bin/python")
    assert stack.api_url == f"http://127.0.0.1:{stack.api_port}"


def test_a_postgres_stack_runs_its_own_server_and_keeps_its_data(tmp_path):
    import sqlalchemy as sa

    pg = Stack(tmp_path / "pg-run", postgres_port=free_port(), database="postgres")
    assert pg.env()["RETRAIN_DATABASE_URL"] == f"postgresql+psycopg://retrain@127.0.0.1:{pg.postgres_port}/retrain"
    try:
        pg.up(["postgres"])
        engine = sa.create_engine(pg.database_url)
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE kept (v text)")
            connection.exec_driver_sql("INSERT INTO kept VALUES ('still here')")
        engine.dispose()
        pg.down(["postgres"])
        assert not pg.is_running("postgres")
        pg.up(["postgres"])  # the same cluster again: data survives down/up
        engine = sa.create_engine(pg.database_url)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT v FROM kept").scalar() == "still here"
        engine.dispose()
    finally:
        pg.down()
        pg.purge_postgres()
    assert not pg.data_dir("postgres").exists()


def test_unknown_service_is_refused(stack):
    with pytest.raises(ValueError):
        stack.up(["redis"])


def test_up_produce_consume_put_get_down_up(stack):
    from confluent_kafka.admin import AdminClient, NewTopic

    t0 = time.monotonic()
    stack.up(["kafka", "minio"])
    print(f"kafka + minio ready in {time.monotonic() - t0:.1f} s")
    for name in ("kafka", "minio"):
        assert stack.is_running(name)
        assert stack.pid_path(name).exists()
        assert stack.log_path(name).exists()

    # up again: nothing is restarted.
    pids = {n: stack.pid(n) for n in ("kafka", "minio")}
    stack.up(["kafka", "minio"])
    assert {n: stack.pid(n) for n in ("kafka", "minio")} == pids

    # Kafka: an explicit topic, one message there and back.
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    topic = "stack-check"
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
    del admin  # it would keep reconnecting (and logging) across the restart below
    assert _kafka_roundtrip(stack, topic, b"hello") == [b"hello"]

    # MinIO: a bucket and an object.
    mc = _minio(stack)
    mc.make_bucket("stack-check")
    import io

    mc.put_object("stack-check", "a/b.txt", io.BytesIO(b"payload"), length=7)
    assert mc.get_object("stack-check", "a/b.txt").read() == b"payload"

    # down: processes gone, pid files gone, data kept.
    stack.down()
    for name in ("kafka", "minio"):
        assert not stack.is_running(name)
        assert not stack.pid_path(name).exists()
        assert any(stack.data_dir(name).iterdir())

    # up again on the same data: the message and the object are still there.
    t0 = time.monotonic()
    stack.up(["kafka", "minio"])
    print(f"kafka + minio ready again in {time.monotonic() - t0:.1f} s")
    assert _kafka_roundtrip(stack, topic, None) == [b"hello"]
    assert _minio(stack).get_object("stack-check", "a/b.txt").read() == b"payload"


def test_kill_then_up_restarts(stack):
    import io

    stack.up(["minio"])
    mc = _minio(stack)
    if not mc.bucket_exists("kill-check"):
        mc.make_bucket("kill-check")
    mc.put_object("kill-check", "x", io.BytesIO(b"kept"), length=4)
    old = stack.pid("minio")
    assert stack.kill("minio", signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stack.is_running("minio") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stack.is_running("minio")
    stack.up(["minio"])  # the stale pid file does not fool it
    assert stack.is_running("minio") and stack.pid("minio") != old
    assert _minio(stack).get_object("kill-check", "x").read() == b"kept"


def test_port_taken_by_another_program_is_an_error(stack, tmp_path):
    other = Stack(tmp_path, minio_port=stack.minio_port, minio_console_port=free_port())
    with pytest.raises(StackError, match="already in use"):
        other.up(["minio"])
