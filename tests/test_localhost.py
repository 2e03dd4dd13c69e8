"""The local runner (d365_tooling.localhost) against real Azurite, with the tiny app in tests/localhost_app."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from d365_tooling.localhost import FunctionLoadError, HostSettings, LocalHost, check_function_folder

APP = Path(__file__).parent / "localhost_app"
REPO = Path(__file__).resolve().parents[1]
ENV = {"LH_SCHEDULE": "0 0 6 * * *", "LH_START_QUEUE": "lh-start"}
FAST = {"visibilityTimeout": 0.2, "maxPollingInterval": 0.2, "maxDequeueCount": 3, "batchSize": 16}


# ------------------------------------------------------------------------------------------------ helpers


def queue(conn: str, name: str) -> QueueClient:
    return QueueClient.from_connection_string(
        conn, name, message_encode_policy=TextBase64EncodePolicy(), message_decode_policy=TextBase64DecodePolicy()
    )


def send(conn: str, name: str, text: str) -> None:
    q = queue(conn, name)
    with contextlib.suppress(ResourceExistsError):
        q.create_queue()
    q.send_message(text)


def raw_messages(conn: str, name: str) -> list[str]:
    """The wire text of up to 32 visible messages (peek: dequeue counts are not touched)."""
    try:
        return [m.content for m in QueueClient.from_connection_string(conn, name).peek_messages(max_messages=32)]
    except ResourceNotFoundError:
        return []


def messages(conn: str, name: str) -> list[str]:
    return [base64.b64decode(text).decode("utf-8") for text in raw_messages(conn, name)]


def count(conn: str, name: str) -> int:
    try:
        props = QueueClient.from_connection_string(conn, name).get_queue_properties()
    except ResourceNotFoundError:
        return 0
    return int(props.approximate_message_count or 0)


# ------------------------------------------------------------------------------------------ timer + chain


async def test_timer_output_reaches_queue_base64_encoded(storage: str) -> None:
    env = {**ENV, "LH_START_QUEUE": "lh-start-from-setting"}
    async with LocalHost(APP, connection_string=storage, env=env, functions=["start_timer"]) as host:
        assert host.output_queue("start_timer", "out") == "lh-start-from-setting"  # %LH_START_QUEUE% resolved
        await host.fire_timer("start_timer")
    raw = raw_messages(storage, "lh-start-from-setting")
    assert len(raw) == 1
    assert not raw[0].startswith("{")  # Base64 on the wire, as the host writes it
    assert json.loads(base64.b64decode(raw[0])) == {"path": ["start_timer"], "past_due": False}


async def test_chained_functions_run_in_order(storage: str) -> None:
    async with LocalHost(
        APP, connection_string=storage, env=ENV, functions=["start_timer", "echo", "relay"], host_overrides=FAST
    ) as host:
        await host.fire_timer("start_timer")
        send(storage, "lh-start", json.dumps({"path": ["manual"], "copies": 3}))
        report = await host.run(timeout=20, idle_seconds=0.5)
    assert report.stopped_because == "idle"
    assert report.functions["echo"].successes == 2
    assert report.functions["relay"].successes == 4
    assert report.failures == 0
    final = sorted((json.loads(m) for m in messages(storage, "lh-final")), key=lambda m: m["path"][0])
    assert [m["path"] for m in final] == [["manual", "echo", "relay"]] * 3 + [["start_timer", "echo", "relay"]]
    assert sorted(m["copy"] for m in final[:3]) == [0, 1, 2]
    assert all(m["dequeue_count"] == 1 for m in final)
    assert count(storage, "lh-start") == 0 and count(storage, "lh-relay") == 0  # consumed = deleted


# ---------------------------------------------------------------------------------- failures and poison


async def test_failing_message_is_retried_then_poisoned_with_same_body(storage: str) -> None:
    env = {**ENV, "LH_OTHER_STORAGE": storage}  # the binding's "connection" setting
    send(storage, "lh-fails", "payload that always fails")
    original = raw_messages(storage, "lh-fails")

    async def poisoned() -> bool:
        return count(storage, "lh-fails-poison") > 0

    started = time.monotonic()
    async with LocalHost(
        APP, connection_string=storage, env=env, functions=["always_fails"], host_overrides=FAST
    ) as host:
        report = await host.run(until=poisoned, timeout=20)
    elapsed = time.monotonic() - started
    assert report.stopped_because == "until"
    stats = report.functions["always_fails"]
    assert (stats.invocations, stats.successes, stats.failures, stats.poisoned) == (3, 0, 3, 1)
    assert elapsed >= 2 * 0.2  # two waits of visibilityTimeout between the three attempts
    assert raw_messages(storage, "lh-fails-poison") == original  # same body, byte for byte
    assert count(storage, "lh-fails") == 0
    assert count(storage, "lh-fails-out") == 0  # output bindings are not written when main raises


async def test_dequeue_count_increments_and_output_written_only_on_success(storage: str) -> None:
    send(storage, "lh-flaky", json.dumps({"id": "m1", "fail_times": 2}))
    overrides = {**FAST, "visibilityTimeout": 1, "maxDequeueCount": 5}  # whole seconds: update_message path
    async with LocalHost(
        APP, connection_string=storage, env=ENV, functions=["flaky"], host_overrides=overrides
    ) as host:
        report = await host.run(timeout=20, idle_seconds=0.3)
    stats = report.functions["flaky"]
    assert (stats.invocations, stats.failures, stats.successes, stats.poisoned) == (3, 2, 1, 0)
    assert report.elapsed >= 2.0  # hidden ≥1 s after each failure
    # the Out was set on every attempt, but only the successful (third) one was written
    assert [json.loads(m) for m in messages(storage, "lh-flaky-out")] == [
        {"id": "m1", "dequeue_count": 3, "metadata": True}
    ]
    assert count(storage, "lh-flaky-poison") == 0


async def test_message_that_is_not_base64_goes_to_poison(storage: str) -> None:
    q = QueueClient.from_connection_string(storage, "lh-flaky")
    q.create_queue()
    q.send_message("plain text, not base64!")  # no encode policy: what a misconfigured producer sends
    async with LocalHost(
        APP, connection_string=storage, env=ENV, functions=["flaky"], host_overrides={**FAST, "maxDequeueCount": 1}
    ) as host:
        report = await host.run(timeout=10, idle_seconds=0.3)
    assert report.functions["flaky"].poisoned == 1
    assert raw_messages(storage, "lh-flaky-poison") == ["plain text, not base64!"]


async def test_batch_runs_concurrently(storage: str) -> None:
    for i in range(12):
        send(storage, "lh-relay", json.dumps({"path": [f"m{i}"]}))
    async with LocalHost(APP, connection_string=storage, env=ENV, functions=["relay"], host_overrides=FAST) as host:
        report = await host.run(timeout=20, idle_seconds=0.3)
    assert report.functions["relay"].successes == 12
    assert count(storage, "lh-final") == 12


async def test_batch_size_invocations_run_in_parallel(storage: str) -> None:
    for i in range(8):
        send(storage, "lh-slow", json.dumps({"id": i, "seconds": 0.4}))
    async with LocalHost(
        APP, connection_string=storage, env=ENV, functions=["slow"], host_overrides={**FAST, "batchSize": 8}
    ) as host:
        report = await host.run(timeout=20, idle_seconds=0.3)
    assert report.functions["slow"].successes == 8
    done = [json.loads(m) for m in messages(storage, "lh-slow-done")]
    assert sorted(d["id"] for d in done) == list(range(8))
    assert len({d["thread"] for d in done}) > 1  # sync mains ran in several threads
    # …at the same time: the most invocations running at once (from their own start/end marks, one process)
    marks = sorted([(d["started"], 1) for d in done] + [(d["ended"], -1) for d in done])
    running = [sum(step for _, step in marks[:i + 1]) for i in range(len(marks))]
    assert max(running) > 1


async def test_lease_is_renewed_while_main_runs(storage: str) -> None:
    """A run longer than the message lease: the lease is renewed, so nobody gets the message a second time."""
    send(storage, "lh-slow", json.dumps({"id": "long", "seconds": 2.6}))
    overrides = {**FAST, "messageLease": 2}  # hidden for 2 s at a time, renewed every 1 s
    async with LocalHost(APP, connection_string=storage, env=ENV, functions=["slow"], host_overrides=overrides) as host:
        report = await host.run(timeout=20, idle_seconds=0.3)
    stats = report.functions["slow"]
    assert (stats.invocations, stats.successes, stats.failures) == (1, 1, 0)
    assert count(storage, "lh-slow") == 0  # deleted with the renewed pop receipt
    assert len(messages(storage, "lh-slow-done")) == 1


def test_several_worker_processes_share_a_queue(storage: str) -> None:
    """Two CLI workers on the same queue: every message is processed exactly once (peek-lock)."""
    for i in range(16):
        send(storage, "lh-slow", json.dumps({"id": i, "seconds": 0.3}))
    env = {**os.environ, "AzureWebJobsStorage": storage, **ENV}
    cmd = [sys.executable, "-m", "d365_tooling.localhost", "--app-root", str(APP), "--functions", "slow"]
    cmd += ["--timeout", "20", "--idle-seconds", "0.5", "--host", "maxPollingInterval=0.2", "--host", "batchSize=4"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    reports = [json.loads(out) for out, _ in outputs]
    assert sum(r["functions"]["slow"]["successes"] for r in reports) == 16
    done = [json.loads(m) for m in messages(storage, "lh-slow-done")]
    assert sorted(d["id"] for d in done) == list(range(16))  # no message twice
    assert len({d["pid"] for d in done}) == 2  # both workers took part


# ------------------------------------------------------------------------------------- settings, stopping


async def test_missing_setting_is_a_load_error(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LH_START_QUEUE", raising=False)
    with pytest.raises(FunctionLoadError, match="LH_START_QUEUE"):
        LocalHost(APP, connection_string=storage, env={"LH_SCHEDULE": "x"}, functions=["echo"])
    assert "LH_SCHEDULE" not in os.environ  # exported settings are rolled back on failure


async def test_settings_exported_while_open_and_restored(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LH_START_QUEUE", raising=False)
    host = LocalHost(APP, connection_string=storage, env=ENV, functions=["echo"])
    assert os.environ["LH_START_QUEUE"] == "lh-start"
    assert host.trigger_queue("echo") == "lh-start"
    await host.aclose()
    assert "LH_START_QUEUE" not in os.environ


async def test_run_stops_when_idle_and_on_timeout(storage: str) -> None:
    async with LocalHost(
        APP, connection_string=storage, env=ENV, functions=["echo", "relay"], host_overrides=FAST
    ) as host:
        report = await host.run(idle_seconds=0.3, timeout=10)
        assert report.stopped_because == "idle" and report.invocations == 0  # not the 10 s timeout
        report = await host.run(idle_seconds=None, timeout=0.5)
        assert report.stopped_because == "timeout"
        # an invisible (in-flight elsewhere) message keeps the queue busy: approximate count includes it
        send(storage, "lh-relay", json.dumps({"path": ["x"]}))
        QueueClient.from_connection_string(storage, "lh-relay").receive_message(visibility_timeout=30)
        report = await host.run(idle_seconds=0.3, timeout=1.5)
        assert report.stopped_because == "timeout"


def test_host_settings_from_host_json_and_overrides() -> None:
    s = HostSettings.load(REPO, {"batchSize": 2, "visibilityTimeout": 0.5})
    assert (s.max_polling_interval, s.visibility_timeout, s.batch_size, s.max_dequeue_count) == (10.0, 0.5, 2, 5)
    assert (
        HostSettings.load(
            REPO, env={"AzureFunctionsJobHost__extensions__queues__maxDequeueCount": "9"}
        ).max_dequeue_count
        == 9
    )
    with pytest.raises(ValueError):
        HostSettings.load(REPO, {"nonsense": 1})


# ------------------------------------------------------------------------------------------------- http


async def test_http_function(storage: str) -> None:
    async with LocalHost(APP, connection_string=storage, env=ENV, functions=["http_hello"]) as host:
        resp = await host.call_http("http_hello", url="/api/hello/ann")
        assert resp.status_code == 200 and json.loads(resp.get_body()) == {"hello": "ann", "method": "GET"}
        resp = await host.call_http("http_hello", url="/api/hello", params={"name": "bob"})
        assert json.loads(resp.get_body())["hello"] == "bob"
        resp = await host.call_http("http_hello", "POST", "/api/hello", body=b'{"name": "cy"}')
        assert json.loads(resp.get_body()) == {"hello": "cy", "method": "POST"}
        assert (await host.call_http("http_hello", "DELETE", "/api/hello")).status_code == 405
        url = host.serve_http(port=0)

        def get(path: str) -> tuple[int, Any]:
            try:
                with urllib.request.urlopen(url + path, timeout=5) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                return err.code, None

        status, doc = await asyncio.to_thread(get, "/api/hello/dee?x=1")
        assert (status, doc) == (200, {"hello": "dee", "method": "GET"})
        assert (await asyncio.to_thread(get, "/api/nothing"))[0] == 404


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_fires_timer_and_serves_chain(storage: str) -> None:
    env = {**os.environ, "AzureWebJobsStorage": storage, **ENV}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "d365_tooling.localhost",
            "--app-root",
            str(APP),
            "--timer",
            "start_timer",
            "--functions",
            "start_timer",
            "echo",
            "relay",
            "--timeout",
            "20",
            "--idle-seconds",
            "0.5",
            "--host",
            "maxPollingInterval=0.2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["stopped_because"] == "idle"
    assert report["functions"]["relay"]["successes"] == 1
    assert [json.loads(m)["path"] for m in messages(storage, "lh-final")] == [["start_timer", "echo", "relay"]]


# ----------------------------------------------------------------------------------- signature checker


def make_function(root: Path, name: str, bindings: list[dict[str, Any]], code: str, **extra: Any) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "function.json").write_text(json.dumps({"bindings": bindings, **extra}))
    (folder / "__init__.py").write_text("import azure.functions as func\nimport typing\n\n" + textwrap.dedent(code))
    return folder


QT = {"name": "msg", "type": "queueTrigger", "direction": "in", "queueName": "q"}
QO = {"name": "out", "type": "queue", "direction": "out", "queueName": "q2"}
TT = {"name": "timer", "type": "timerTrigger", "direction": "in", "schedule": "0 * * * * *"}
HT = {"name": "req", "type": "httpTrigger", "direction": "in"}
HO = {"name": "$return", "type": "http", "direction": "out"}

# The oracle is the real worker (azure-functions-runtime-v1): a case it rejects is INVALID, with its own message.
VALID = [
    ([QT, QO], "def main(msg: func.QueueMessage, out: func.Out[str]) -> None: ..."),
    ([QT, QO], "async def main(msg: func.QueueMessage, out: func.Out[typing.List[str]]) -> None: ..."),
    ([QT, QO], "def main(msg: func.QueueMessage, out: func.Out[typing.List[str]], context: func.Context): ..."),
    ([QT], "def main(msg: str) -> None: ..."),  # the worker accepts str/bytes for any binding
    ([QT], "def main(msg): ..."),  # no annotations at all is allowed
    ([TT, QO], "def main(timer: func.TimerRequest, out: func.Out[str]) -> None: ..."),
    ([HT, HO], "def main(req: func.HttpRequest) -> func.HttpResponse: ..."),
    ([QT, {**QO, "name": "$return"}], "def main(msg: func.QueueMessage) -> str: ..."),
]

INVALID = [
    # Azure/azure-functions-python-worker#1176: the builtin generic is not accepted inside Out[...].
    (
        "binding out has invalid non-type annotation azure.functions._abc.Out[list[str]]",
        [QT, QO],
        "async def main(msg: func.QueueMessage, out: func.Out[list[str]]) -> None: ...",
    ),
    ("declared in Python but not in function.json", [QT], "def main(msg: func.QueueMessage, extra: str): ..."),
    ("declared in function.json but not in Python", [QT, QO], "def main(msg: func.QueueMessage): ..."),
    ("not a subclass of azure.functions.Out", [QT, QO], "def main(msg: func.QueueMessage, out: str): ..."),
    ("is azure.functions.Out in Python", [QT], "def main(msg: func.Out[str]): ..."),
    ('"queueTrigger" does not match', [QT], "def main(msg: func.HttpRequest): ..."),
    ('"timerTrigger" does not match', [TT], "def main(timer: func.QueueMessage): ..."),
    ('"httpTrigger" does not match', [HT, HO], "def main(req: func.TimerRequest) -> func.HttpResponse: ..."),
    (
        '"$return" binding must have direction set to "out"',
        [QT, {**HO, "direction": "in"}],
        "def main(msg: func.QueueMessage): ...",
    ),
    ('return annotation "int" does not match', [HT, HO], "def main(req: func.HttpRequest) -> int: ..."),
    ('"context" parameter is expected', [QT], "def main(msg: func.QueueMessage, context: str): ..."),
    ("exactly one trigger", [QO], "def main(out: func.Out[str]): ..."),  # a host rule
    ("needs a 'queueName' property", [{**QT, "queueName": ""}], "def main(msg): ..."),  # a host rule
    ("needs a 'schedule' property", [{k: v for k, v in TT.items() if k != "schedule"}], "def main(timer): ..."),
    ("is not present in", [QT], "def run(msg: func.QueueMessage): ..."),
    ("No module named 'does_not_exist_anywhere'", [QT], "import does_not_exist_anywhere\ndef main(msg): ..."),
]


@pytest.mark.parametrize(("bindings", "code"), VALID, ids=[f"valid{i}" for i in range(len(VALID))])
def test_checker_accepts_valid_functions(tmp_path: Path, bindings: list[dict[str, Any]], code: str) -> None:
    check_function_folder(make_function(tmp_path, f"lh_valid_{abs(hash(code)) % 10**8}", bindings, code))


@pytest.mark.parametrize(("expected", "bindings", "code"), INVALID, ids=[c[0][:40] for c in INVALID])
def test_checker_catches_each_violation(
    tmp_path: Path, expected: str, bindings: list[dict[str, Any]], code: str
) -> None:
    folder = make_function(tmp_path, f"lh_invalid_{abs(hash(code)) % 10**8}", bindings, code)
    with pytest.raises(FunctionLoadError) as err:
        check_function_folder(folder)
    assert expected in str(err.value)


def test_checker_reads_script_file_and_entry_point(tmp_path: Path) -> None:
    folder = tmp_path / "lh_entry"
    folder.mkdir()
    (folder / "function.json").write_text(json.dumps({"scriptFile": "other.py", "entryPoint": "go", "bindings": [QT]}))
    (folder / "other.py").write_text("import azure.functions as func\ndef go(msg: func.QueueMessage): ...\n")
    check_function_folder(folder)
    (folder / "function.json").write_text(json.dumps({"scriptFile": "missing.py", "bindings": [QT]}))
    with pytest.raises(FunctionLoadError, match=r"missing\.py"):
        check_function_folder(folder)
    (folder / "function.json").write_text("{not json")
    with pytest.raises(FunctionLoadError, match="not valid JSON"):
        check_function_folder(folder)


def test_a_wrong_annotation_in_a_scratch_folder_gets_the_workers_own_message(tmp_path: Path) -> None:
    """The message is the worker's, word for word (the same text Azure logs when it refuses the folder)."""
    folder = make_function(
        tmp_path,
        "lh_scratch_purchase",
        [QT, {**QO, "name": "reassign"}],
        "async def main(msg: func.QueueMessage, reassign: func.Out[list[str]]) -> None: ...",
    )
    with pytest.raises(FunctionLoadError) as err:
        check_function_folder(folder)
    assert str(err.value) == (
        "FunctionLoadError: cannot load the lh_scratch_purchase function: binding reassign has invalid non-type "
        "annotation azure.functions._abc.Out[list[str]]"
    )


def test_worker_library_is_the_pinned_one_and_tests_package_is_ours() -> None:
    """The worker wheel ships a top-level ``tests`` package; the project's ``tests`` must win, and the worker's
    protobuf messages still load (by path, under a private name)."""
    import importlib.metadata

    import tests
    from d365_tooling.localhost._worker import WORKER_VERSION, rpc_protos

    pinned = next(
        line.split("==")[1].strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.startswith("azure-functions-runtime-v1==")
    )
    assert importlib.metadata.version("azure-functions-runtime-v1") == WORKER_VERSION == pinned
    assert Path(tests.__file__).resolve().parent == REPO / "tests"
    protos = rpc_protos()
    assert protos.TypedData(string="x").WhichOneof("data") == "string"
    assert "tests.protos" not in sys.modules


async def test_an_output_the_worker_cannot_convert_fails_the_invocation(tmp_path: Path, storage: str) -> None:
    """``Out[List[str]]`` set to a list holding a dict: the real worker's queue converter refuses to encode it, so
    the invocation fails, nothing is written, and the message is retried and finally poisoned -- as in Azure."""
    (tmp_path / "host.json").write_text((APP / "host.json").read_text())
    make_function(
        tmp_path,
        "lh_bad_output",
        [{**QT, "queueName": "lh-bad"}, {**QO, "queueName": "lh-bad-out"}],
        "def main(msg: func.QueueMessage, out: func.Out[typing.List[str]]) -> None:\n    out.set([{'a': 1}])\n",
    )
    send(storage, "lh-bad", "hello")
    async with LocalHost(tmp_path, connection_string=storage, host_overrides=FAST) as host:
        report = await host.run(timeout=20, idle_seconds=0.5)
    stats = report.functions["lh_bad_output"]
    assert (stats.successes, stats.failures, stats.poisoned) == (0, 3, 1)
    assert count(storage, "lh-bad-out") == 0
    assert messages(storage, "lh-bad-poison") == ["hello"]
