"""The load generator's bookkeeping (bench/loadgen.py, bench/drain.py), without a
server: deliveries merged from helper processes, the drain client's seq tracking
and its reconnect delays, the Socket.IO members' packets. No timing is asserted."""

import argparse
import asyncio
import os
import signal
from types import SimpleNamespace

import pytest
import websockets

from bench import drain, loadgen, run


def test_deliveries_from_several_helper_processes_merge_into_one_summary():
    sent = {0: 10.0, 1: 11.0, 2: 12.0}
    # Two helpers' members as finish_helpers rebuilds them from their JSON.
    first = loadgen.Delivered([[0, 10.002], [1, 11.004], [2, 12.001]])
    second = loadgen.Delivered([[0, 10.003], [0, 10.005], [2, 12.010]])
    result = loadgen.summarize(sent, [first, second], started=10.0)
    assert result["deliveries"] == 5
    assert result["lost"] == 1  # the second member never had message 1
    assert result["duplicated"] == 1  # and had message 0 twice
    assert result["max_ms"] == 10.0


def test_the_drain_client_keeps_the_last_seq_and_counts_every_copy():
    target = SimpleNamespace(kind="full", cookie="sessionid=x", room="bench")
    storm = drain.Storm(target, "r1")
    client = drain.Client(storm, 1234)
    client.conn = conn = object()
    client.frame(conn, b'{"type":"message.new","room":"bench","seq":41,"id":1,"body":"r1:7:"}', 1.0)
    client.frame(conn, b'{"type":"message.new","room":"bench","seq":42,"id":2,"body":"r1:8:"}', 1.1)
    client.frame(conn, b'{"type":"message.new","room":"bench","seq":41,"id":1,"body":"r1:7:"}', 1.2)
    client.frame(conn, b'{"type":"presence.diff","room":"bench","joins":["a"],"count":2}', 1.3)
    client.frame(object(), b'{"type":"message.new","room":"bench","seq":50,"id":9,"body":"r1:9:"}', 1.4)  # an old socket's
    assert client.got == [7, 8, 7]
    assert client.last_seq == 42


def test_the_reconnect_delays_follow_the_browser_clients_equal_jitter():
    for attempt in range(8):
        ceiling = min(drain.BACKOFF_CAP, drain.BACKOFF_BASE * 2 ** attempt)
        for _ in range(50):
            assert ceiling / 2 <= drain.backoff(attempt) <= ceiling


def test_after_a_restart_the_drain_client_comes_back_within_the_reasons_spread():
    hinted = [drain.restart_delay("spread_ms=50") for _ in range(200)]
    assert all(0 <= d <= 0.05 for d in hinted)
    assert max(hinted) > 0.025  # drawn over the window, not at its start
    for reason in ("", "1012 Service Restart", "spread_ms=x"):  # no hint: the restart jitter
        assert all(0.1 <= drain.restart_delay(reason) <= 1.0 for _ in range(50))


@pytest.mark.asyncio
async def test_a_socketio_member_opens_joins_with_an_ack_and_answers_pings():
    """bench/peers.py's members speak Engine.IO 4 and Socket.IO 5 to the peers: the
    packets a member sends, in order, against a server that pings it midway (a
    stand-in: the real peers run in `make bench`, not here)."""
    heard = []
    reading_raw = asyncio.Event()  # the member reads its socket's frames itself

    async def server(ws):
        await ws.send('0{"sid":"e1","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":65536}')
        heard.append(await ws.recv())  # the namespace's connect
        await ws.send("2")  # a ping before the connect is answered
        heard.append(await ws.recv())
        await ws.send('40{"sid":"s1"}')
        heard.append(await ws.recv())  # the join, with its ack id
        await ws.send('42["message","not the ack"]')
        await ws.send("430[true]")
        await reading_raw.wait()
        await ws.send("2")  # a ping once the member reads raw frames
        heard.append(await ws.recv())
        await ws.send('42["message","r1:3:"]')
        await ws.wait_closed()

    async with websockets.serve(server, "127.0.0.1", 0) as listening:
        port = listening.sockets[0].getsockname()[1]
        target = loadgen.Target("socketio", [port], "", "", "bench")
        ws = await target.connect()
        member = loadgen.Member(ws, "r1")
        reading_raw.set()
        while not member.got:
            await asyncio.sleep(0.01)
        await member.close()
    assert heard == ["40", "3", '420["join", "bench"]', "3"]
    assert [n for n, _ in member.got] == [3]
    assert target.frame("r1:4:", 4) == '42["message", "bench", "r1:4:"]'


@pytest.mark.asyncio
async def test_a_socketio_join_that_is_refused_is_not_a_member():
    async def server(ws):
        await ws.send('0{"sid":"e1"}')
        await ws.recv()
        await ws.send('40{"sid":"s1"}')
        await ws.recv()
        await ws.send("430[false]")
        await ws.wait_closed()

    async with websockets.serve(server, "127.0.0.1", 0) as listening:
        target = loadgen.Target("socketio", [listening.sockets[0].getsockname()[1]], "", "", "bench")
        with pytest.raises(loadgen.SubscribeRefused, match="join_refused"):
            await target.connect()


def test_loopback_steering_is_set_for_the_block_and_put_back_after_it(tmp_path, monkeypatch):
    """--steer-loopback: the receiving side goes to the load generator's core for
    the measurement, and the machine's setting is as it was afterwards, even when
    the measurement fails (the real file is the kernel's: a stand-in here)."""
    setting = tmp_path / "rps_cpus"
    setting.write_text("0\n")
    monkeypatch.setattr(run, "LOOPBACK_STEERING", setting)
    with run.loopback_steered(1):
        assert setting.read_text() == "2\n"
    assert setting.read_text() == "0\n"
    with pytest.raises(RuntimeError), run.loopback_steered(1):
        assert setting.read_text() == "2\n"
        raise RuntimeError("a measurement that failed")
    assert setting.read_text() == "0\n"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit), run.loopback_steered(1):
        os.kill(os.getpid(), signal.SIGTERM)  # a bench stopped from outside: its handler runs at once
    assert setting.read_text() == "0\n"
    assert signal.getsignal(signal.SIGTERM) == handler
    with run.loopback_steered(None):
        assert setting.read_text() == "0\n"


def test_loopback_steering_that_cannot_be_set_is_a_usage_error(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    run.steering_option(parser)
    asked, not_asked = parser.parse_args(["--steer-loopback"]), parser.parse_args([])
    monkeypatch.setattr(run, "LOOPBACK_STEERING", tmp_path / "absent")  # no such setting (a kernel without RPS)
    with pytest.raises(SystemExit) as exited:
        run.steering_checked(parser, asked)
    assert exited.value.code == 2
    assert run.steering_checked(parser, not_asked) is None
    setting = tmp_path / "rps_cpus"
    setting.write_text("0\n")
    monkeypatch.setattr(run, "LOOPBACK_STEERING", setting)
    monkeypatch.setattr(run, "pinned", lambda core: ["taskset", "-c", str(core)])
    assert run.steering_checked(parser, asked) == 1
    monkeypatch.setattr(run, "pinned", lambda core: [])  # one core, or no taskset: no load generator's core apart
    with pytest.raises(SystemExit) as exited:
        run.steering_checked(parser, asked)
    assert exited.value.code == 2


@pytest.mark.asyncio
async def test_the_steady_profile_samples_the_worker_between_its_start_and_stop(tmp_path, monkeypatch):
    """run.py --profile NAME --steady: the load generator samples the first worker
    with py-spy from its first send to its last delivery (a busy stand-in worker
    here): what it ran then is in the output, every busy thread counted."""
    busy = await asyncio.create_subprocess_exec(
        loadgen.sys.executable, "-c", "import time\ndef steady_busy_loop():\n    while True:\n        time.monotonic()\n"
        "steady_busy_loop()")
    try:
        monkeypatch.delenv("BENCH_STEADY_PROFILE", raising=False)
        inert = await loadgen.steady_profile([busy.pid])
        assert inert.proc is None
        await inert.stop()
        out = tmp_path / "steady.txt"
        monkeypatch.setenv("BENCH_STEADY_PROFILE", str(out))
        spy = await loadgen.steady_profile([busy.pid])
        await asyncio.sleep(0.5)
        await spy.stop()
        assert "steady_busy_loop" in out.read_text()
    finally:
        busy.kill()
        await busy.wait()


def test_steady_goes_with_profile(monkeypatch, capsys):
    monkeypatch.setattr(run.sys, "argv", ["run.py", "--steady"])
    monkeypatch.setattr(run, "run", lambda parser, args: pytest.fail("--steady alone ran the bench"))
    with pytest.raises(SystemExit) as exited:
        run.main()
    assert exited.value.code == 2
    assert "--steady goes with --profile" in capsys.readouterr().err


def test_the_workers_cores_come_in_turn_from_bench_worker_cores(monkeypatch):
    """BENCH_WORKER_CORES: the cores an A/B pins the workers to in turn (core 0 for
    all of them unless it is set), in the command each worker starts with."""
    monkeypatch.setattr(run, "pinned", lambda core: ["taskset", "-c", str(core)])
    monkeypatch.delenv("BENCH_WORKER_CORES", raising=False)
    assert run.worker_cores() == [0]
    assert run.worker_cores(run.SCENARIOS[run.ROOM_SHARED][0]) == [0]
    # The big room's readers yield, and its workers get a core each.
    assert run.worker_cores(run.SCENARIOS[run.ROOM][0]) == [0, 1]
    assert run.worker_cores(run.QUICK["500-member room on 2 workers, 10 msg/s, p99"][0]) == [0, 1]
    # (one process reading its members itself does not yield: no core each then)
    assert run.worker_cores(["--scenario", "rate", "--procs", "1", "--yield-readers"]) == [0]
    monkeypatch.setenv("BENCH_WORKER_CORES", "0,1")
    assert run.worker_cores() == [0, 1]
    monkeypatch.setenv("BENCH_WORKER_CORES", "0")
    assert run.worker_cores(run.SCENARIOS[run.ROOM][0]) == [0]
    worker = run.BenchWorker.__new__(run.BenchWorker)
    worker.core, worker.port = 1, 8000
    run.BenchWorker.server = "uvicorn"
    try:
        assert worker.command()[:3] == ["taskset", "-c", "1"]
    finally:
        run.BenchWorker.server = "daphne"


def test_the_churn_table_shows_each_rounds_memory_and_the_growth(tmp_path):
    """bench/run.py's Scale section: the churn scenario's table, a row per size,
    the worker's memory after each round and what the rounds after the first added."""
    full = {"connections": 2000, "rounds": 3, "empty_worker_mib": 92.2, "rounds_mib": [114.5, 115.1, 115.2],
            "worker_mib": 115.2, "growth_mib": 0.7}
    bare = {"connections": 2000, "rounds": 3, "empty_worker_mib": 92.0, "rounds_mib": [160.4, 168.2, 168.5],
            "worker_mib": 168.5, "growth_mib": 8.1}
    rows = [(run.CHURN, "worker_mib", None, 168.5, 115.2, 1.46, {"full": [full], "bare": [bare]})]
    lines = run.scale_section(rows, tmp_path)
    assert "| 2,000 | 92.2 MiB | 114.5 / 115.1 / 115.2 MiB  | 0.7 MiB | 160.4 / 168.2 / 168.5 MiB  | 8.1 MiB |" in lines


def member_pair(pattern=rb"run1:(\d+):"):
    """A connected pair: the server's end, and a member's (rxstamp.Stamped) asking
    for kernel stamps, as rxstamp.adopt leaves it."""
    import re
    import socket
    import time

    from bench import rxstamp

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    client.setsockopt(socket.SOL_SOCKET, rxstamp.SO_TIMESTAMPNS, 1)
    # The kernel turns receive stamps on for the machine a moment after the first
    # socket asks (deferred work): a byte at a time until one comes stamped.
    client.settimeout(10)
    for _ in range(1000):
        server.sendall(b"x")
        _, ancdata, _, _ = client.recvmsg(1, socket.CMSG_SPACE(16))
        if ancdata:
            break
        time.sleep(0.001)
    else:
        raise AssertionError("no receive stamp from this kernel")
    client.setblocking(False)
    return server, rxstamp.Stamped(client, re.compile(pattern))


def waiting_bytes(sock) -> int:
    """The bytes in a socket's receive queue, not yet read (SIOCINQ)."""
    import array
    import fcntl
    import termios

    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


def read_served(server, member, end: bytes, serve=None):
    """rxstamp.read_until on `member` with the END line `end` on its stdin, while
    `serve` (if given) runs in a thread: both ends closed after, and what failed in
    `serve` raised here."""
    import threading

    from bench import rxstamp

    stdin_r, stdin_w = os.pipe()
    failures = []

    def run():
        try:
            serve()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run) if serve is not None else None
    try:
        os.write(stdin_w, end)
        if thread is not None:
            thread.start()
        reading = rxstamp.read_until([member], stdin_r)
    finally:
        if thread is not None:
            thread.join()
        for fd in (stdin_r, stdin_w):
            os.close(fd)
        member.sock.close()
        server.close()
    if failures:
        raise failures[0]
    return reading


def server_frame(opcode, payload):
    return bytes((0x80 | opcode, len(payload))) + payload


def test_a_helpers_member_is_timed_by_its_kernels_receive_stamp_not_by_the_read():
    """bench/rxstamp.py: a frame that arrived before the helper read it keeps the
    time it arrived (the kernel's stamp), and the read's time beside it; a ping
    and a Socket.IO ping are answered; the END line's total ends the reading once
    every member has it."""
    import time

    from bench.wsframes import read_frames

    server, member = member_pair()
    server.sendall(server_frame(1, b'{"text":"run1:0:"}') + server_frame(9, b"hi") + server_frame(1, b"2"))
    arrived = time.monotonic()  # the frames are in the member's kernel by now

    def second():
        # Message 1 once the helper has answered both pings (its loop runs).
        server.settimeout(10)
        answered = b""
        while len(answered) < 14:
            answered += server.recv(64)
        # Two client frames, masked with the zero key: header, key, payload.
        assert answered[1] & 0x80 and answered[8] & 0x80
        assert list(read_frames(bytearray(answered[:2] + answered[6:8] + answered[8:10] + answered[14:]))) == [
            (10, b"hi"), (1, b"3")]
        server.sendall(server_frame(1, b'{"text":"run1:1:"}'))

    reading = read_served(server, member, b"END 2 30 0\n", second)
    # (message 0 came with two pings after it in one read: counted as maybe late)
    assert reading == ("END 2 30 0", 0, True, 1)
    assert [n for n, _ in member.got] == [0, 1] and [n for n, _ in member.read] == [0, 1]
    # Message 0 was in the kernel before the reading began: its stamp says so, its read does not.
    assert member.got[0][1] < arrived <= member.read[0][1]


@pytest.mark.timeout(20)  # a closed member waited for would hold it to the drain (600 s)
def test_a_helpers_reading_ends_with_a_closed_member_and_stops_when_the_sender_is_gone():
    from bench import rxstamp

    server, member = member_pair()
    stdin_r, stdin_w = os.pipe()
    try:
        server.sendall(server_frame(1, b'{"text":"run1:0:"}'))
        server.close()  # message 1 never comes: the member is closed, not waited for
        os.write(stdin_w, b"END 2 600 0\n")
        assert rxstamp.read_until([member], stdin_r)[1:] == (0, False, 0)
        assert [n for n, _ in member.got] == [0] and not member.open
        os.close(stdin_w)
        stdin_w = None
        with pytest.raises(rxstamp.StdinClosed):  # no END line, stdin at its end
            rxstamp.read_until([], stdin_r)
    finally:
        os.close(stdin_r)
        if stdin_w is not None:
            os.close(stdin_w)
        member.sock.close()


def test_a_read_that_takes_two_messages_is_counted_as_merged_and_stamped_with_the_later():
    """bench/rxstamp.py: a member read after two messages' frames had come gets
    one kernel stamp for both, the later one's (the earlier delivery is timed late,
    never early); the reading counts it, so a run whose readers fell a message
    behind says so (RESULTS.md's `late reads`)."""
    import time

    server, member = member_pair()
    server.sendall(server_frame(1, b'{"text":"run1:0:"}'))
    time.sleep(0.05)  # (two segments apart in time, the second stamped later)
    second = time.monotonic()
    server.sendall(server_frame(1, b'{"text":"run1:1:"}'))
    both = 2 * len(server_frame(1, b'{"text":"run1:1:"}'))
    deadline = time.monotonic() + 10
    while waiting_bytes(member.sock) < both:  # (both in its kernel before the reading begins)
        assert time.monotonic() < deadline
        time.sleep(0.001)
    reading = read_served(server, member, b"END 2 30 0\n")
    assert reading == ("END 2 30 0", 0, True, 1)
    assert [n for n, _ in member.got] == [0, 1]
    assert member.got[0][1] == member.got[1][1] >= second


def test_a_yielding_reader_runs_only_in_idle_time_on_every_core():
    """rxstamp.yield_cpu (loadgen --yield-readers): SCHED_IDLE, and free to run on
    any core though the load generator was pinned to one."""
    import subprocess
    import sys

    allowed = sorted(os.sched_getaffinity(0))  # (every core this test may use)
    code = (f"import os; os.sched_setaffinity(0, {{{allowed[0]}}}); from bench import rxstamp; rxstamp.yield_cpu(); "
            "print(os.sched_getscheduler(0) == os.SCHED_IDLE, sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.split(" ", 1) == ["True", f"{allowed}\n"]


def test_a_read_of_exactly_one_data_frame_is_found_without_buffering():
    """rxstamp.one_data_frame: where a lone text or binary frame's payload starts
    (short and 16-bit lengths), 0 for anything read_frames must take apart (a
    ping, a partial frame, a frame and the start of the next)."""
    from bench import rxstamp

    short = server_frame(1, b'{"text":"run1:7:"}')
    long_payload = b'{"text":"run1:8:' + b"x" * 300 + b'"}'
    long = bytes((0x81, 126)) + len(long_payload).to_bytes(2, "big") + long_payload
    assert rxstamp.one_data_frame(short) == 2
    assert rxstamp.one_data_frame(long) == 4
    assert rxstamp.one_data_frame(server_frame(2, b"\x00\x01")) == 2
    assert rxstamp.one_data_frame(server_frame(9, b"hi")) == 0
    assert rxstamp.one_data_frame(long[:-1]) == 0
    assert rxstamp.one_data_frame(short + short[:3]) == 0
    assert rxstamp.one_data_frame(b"\x81") == 0
    assert rxstamp.one_data_frame(server_frame(1, b"2")) == 0  # a Socket.IO ping: answered by the loop


def test_a_lone_socketio_ping_is_answered_and_a_message_with_more_after_it_counts_as_maybe_late():
    """bench/rxstamp.py: a Socket.IO target's ping read on its own is answered
    (the lone-frame path leaves it to the loop); a read that took a message and
    part of the next carries the later segment's stamp, so it is counted (as is a
    message and a ping after it), and the message completed by the next read is
    not."""
    import time

    from bench.wsframes import EIO_PONG_FRAME

    server, member = member_pair()
    second = server_frame(1, b'{"text":"run1:1:"}')
    third = server_frame(1, b'{"text":"run1:2:"}')

    def serve():
        # Each part read apart from the others (the helper reads every 2 ms).
        server.settimeout(10)
        server.sendall(server_frame(1, b"2"))  # alone: no message is sent until it is answered
        answered = b""
        while len(answered) < len(EIO_PONG_FRAME):
            answered += server.recv(64)
        assert answered == EIO_PONG_FRAME
        server.sendall(server_frame(1, b'{"text":"run1:0:"}') + second[:5])
        time.sleep(0.05)
        server.sendall(second[5:])
        time.sleep(0.05)
        server.sendall(third + server_frame(9, b"hi"))

    reading = read_served(server, member, b"END 3 30 0\n", serve)
    # message 0 with part of 1 after it: counted; 1 completed alone: not; 2 and a ping: counted
    assert reading == ("END 3 30 0", 0, True, 2)
    assert [n for n, _ in member.got] == [0, 1, 2]


def test_the_helpers_are_told_to_yield_only_when_asked():
    """loadgen.helper_command: --yield-readers reaches each helper's command."""
    from bench import loadgen

    target = loadgen.Target("full", [8000, 8001], "", "", "bench")
    plain = loadgen.helper_command(target, 1667, 1, 3, "abc", False)
    assert "--yield-readers" not in plain
    assert loadgen.helper_command(target, 1667, 1, 3, "abc", True) == [*plain, "--yield-readers"]
    assert plain[plain.index("--port-offset") + 1:plain.index("--port-step") + 2] == ["1", "--port-step", "3"]


def test_the_room_table_shows_the_late_reads_and_both_layouts(tmp_path):
    """bench/run.py's Scale section: the big room's table, the core-each room and
    the shared-core room, with the reads that may have stamped a message late."""
    full = {"p50_ms": 23.1, "p99_ms": 45.5, "read_p99_ms": 80.2, "first_p99_ms": 25.7, "spread_p99_ms": 66.1,
            "deliveries_per_s": 50243.6, "lost": 0, "cpu_us_per_delivery": 16.2, "merged_reads": 12,
            "loadgen_cpu_sending": 0.49, "loadgen_processes": 4}
    bare = {**full, "p99_ms": 36531.6, "merged_reads": 0}
    rows = [(name, "p99_ms", None, 36531.6, 45.5, None, {"full": [full], "bare": [bare]})
            for name in (run.ROOM, run.ROOM_SHARED)]
    lines = run.scale_section(rows, tmp_path)
    header = next(line for line in lines if line.startswith("| Room |"))
    assert "| late reads |" in header
    shown = [line for line in lines if line.startswith(f"| {run.ROOM} | full") or line.startswith(f"| {run.ROOM_SHARED} | full")]
    assert len(shown) == 2
    assert all(line.count("|") == header.count("|") for line in shown)
    assert all(" | 16.2 | 12 | 0.49 (4) |" in line for line in shown)


def test_the_header_names_the_big_rooms_cores_only_where_it_ran_so(monkeypatch):
    """bench/run.py's header: the workers' cores, and the big room's own (a core
    each) only when a room whose readers yield was among the scenarios run."""
    monkeypatch.setattr(run, "pinned", lambda core: ["taskset", "-c", str(core)])
    monkeypatch.delenv("BENCH_WORKER_CORES", raising=False)
    row = lambda name: (name, "p99_ms", False, 1.0, 1.0, 1.0, {"full": [], "bare": []})  # noqa: E731
    assert run.pinning({"daphne": [row(run.ROOM_SHARED), row("fan-out, 100 members")]}, run.SCENARIOS) == "0"
    assert run.pinning({"daphne": [row(run.ROOM)]}, run.SCENARIOS) == (
        "0 (the big room's: 0 and 1, one each, its members' readers yielding on either core)")
    monkeypatch.setenv("BENCH_WORKER_CORES", "0")  # (set for every scenario: nothing of its own to say)
    assert run.pinning({"daphne": [row(run.ROOM)]}, run.SCENARIOS) == "0"
