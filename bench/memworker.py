"""The worker (`python -m realtime.server ...`) with memory probes, for bench/memprobe.py.

MEMPROBE_TRACE=N starts tracemalloc with N frames at the first probe (tracing the
start-up is too slow for the launcher's wait), so later probes see what was
allocated since the first one and is still alive.
SIGUSR1 writes MEMPROBE_OUT.<k>.json (RSS, glibc mallinfo2, pymalloc, traced bytes,
a histogram of gc-tracked objects by type, one socket's object graph) and, when
tracing, MEMPROBE_OUT.<k>.snap (a tracemalloc snapshot); then MEMPROBE_OUT.<k>.done.
Never used in production.
"""

from __future__ import annotations

import os
import sys
import tracemalloc

import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402

_count = 0


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def mallinfo() -> dict:
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        m = libc.mallinfo2()
        return {name: getattr(m, name) for name, _ in MallInfo2._fields_}
    except Exception:
        return {}


def pymalloc() -> dict:
    """sys._debugmallocstats() (it prints to the C stderr), a few of its totals."""
    out = {}
    with tempfile.TemporaryFile("w+") as tmp:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        for line in tmp:
            if line.startswith("#") and "=" in line:
                key, _, value = line[1:].partition("=")
                try:
                    out[" ".join(key.split())] = int(value.strip().replace(",", ""))
                except ValueError:
                    pass
    return out


def deep_size(obj, seen: set, limit: int = 10000) -> int:
    """Bytes of obj and what it holds that `seen` has not counted yet (modules,
    classes, functions and code are shared and not followed). While tracing, only
    objects allocated since the first probe count (and are followed)."""
    import types

    stack, total = [obj], 0
    new_only = tracemalloc.is_tracing()
    while stack and limit:
        o = stack.pop()
        if id(o) in seen or isinstance(o, (type, types.ModuleType, types.FunctionType, types.CodeType,
                                            types.BuiltinFunctionType)):
            continue
        seen.add(id(o))
        if new_only and tracemalloc.get_object_traceback(o) is None:
            continue  # older than the first probe: shared, not this socket's
        limit -= 1
        total += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return total


def one_socket() -> dict:
    """The object graph of the newest open socket: what each piece holds."""
    from daphne.ws_protocol import WebSocketProtocol

    protos = [o for o in gc.get_objects() if isinstance(o, WebSocketProtocol) and getattr(o, "state", None) == 3]
    if not protos:
        return {}
    proto = protos[-1]
    report: dict = {}
    # Shared things first, so that they are not counted as this socket's.
    seen = {id(proto.factory), id(getattr(proto, "server", None))}
    server = getattr(proto, "server", None)
    if server is not None:
        seen.add(id(server.connections))
    attrs = {}
    d = proto.__dict__
    attrs["__dict__ itself"] = sys.getsizeof(d)
    seen.add(id(d))
    seen.add(id(proto))
    report["protocol object"] = sys.getsizeof(proto)
    report["protocol __dict__ keys"] = len(d)
    # What it keeps in slots (server/bounded.py), then in its dict.
    slotted = {name: getattr(proto, name) for cls in type(proto).__mro__
               for name in getattr(cls, "__slots__", ()) if hasattr(proto, name)}
    report["protocol slots"] = len(slotted)
    for name, value in sorted({**slotted, **d}.items()):
        if name in ("factory", "server", "transport", "application_queue"):
            continue
        attrs[name] = deep_size(value, seen)
    report["protocol attrs"] = {k: v for k, v in sorted(attrs.items(), key=lambda kv: -kv[1]) if v}
    transport = proto.transport
    report["transport (deep, not the protocol)"] = deep_size(transport, seen)
    report["transport type"] = type(transport).__name__
    queue = getattr(proto, "application_queue", None)
    report["application_queue (deep)"] = deep_size(queue, seen) if queue is not None else 0
    details = server.connections.get(proto, {}) if server is not None else {}
    task = details.get("application_instance")
    report["connections[proto] dict"] = sys.getsizeof(details)
    chain = []
    if task is not None:
        chain.append(("Task", sys.getsizeof(task)))
        seen.add(id(task))
        coro = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None)
            name = getattr(coro, "__qualname__", type(coro).__name__)
            size = sys.getsizeof(coro)
            seen.add(id(coro))
            local_sizes = {}
            if frame is not None:
                seen.add(id(frame))
                for k, v in frame.f_locals.items():
                    s = deep_size(v, seen)
                    if s:
                        local_sizes[k] = s
            chain.append((name, size, local_sizes))
            if frame is not None and name == "RealtimeConsumer.__call__":
                consumer = frame.f_locals.get("self")
                if consumer is not None:
                    # What the consumer and its scope hold, key by key (what the
                    # chain's frames did not count already).
                    report["consumer __dict__"] = {"keys": len(consumer.__dict__),
                                                   "itself": sys.getsizeof(consumer.__dict__)}
                    report["consumer attrs"] = {k: deep_size(v, seen) for k, v in consumer.__dict__.items()}
                    scope = consumer.__dict__.get("scope") or {}
                    report["scope"] = {"keys": len(scope), "itself": sys.getsizeof(scope),
                                       **{k: deep_size(v, set(seen) - {id(v)}) for k, v in scope.items()}}
            coro = getattr(coro, "cr_await", None)
            if coro is not None and not hasattr(coro, "cr_frame"):
                chain.append((type(coro).__name__, deep_size(coro, seen)))
                break
    report["application coroutine chain"] = chain
    return report


def on_signal(signum, frame):
    global _count
    base = os.environ["MEMPROBE_OUT"] + f".{_count}"
    _count += 1
    gc.collect()
    traced = None
    if tracemalloc.is_tracing():
        # Before the probe's own allocations (the histogram below).
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.take_snapshot().dump(base + ".snap")
    try:
        sock = one_socket()
    except Exception as exc:  # a probe, never the worker's fault
        sock = {"error": repr(exc)}
    tracemalloc.stop()
    data = {"rss_kib": rss_kib(), "mallinfo": mallinfo(), "pymalloc": pymalloc(),
            "blocks": sys.getallocatedblocks()}
    types: dict[str, list[int]] = {}
    for o in gc.get_objects():
        t = type(o)
        entry = types.setdefault(f"{t.__module__}.{t.__qualname__}", [0, 0])
        entry[0] += 1
        entry[1] += sys.getsizeof(o)
    data["types"] = types
    if traced is not None:
        data["traced"] = traced
    data["one_socket"] = sock
    if _count == 1 and os.environ.get("MEMPROBE_TRACE") and traced is None:
        tracemalloc.start(int(os.environ["MEMPROBE_TRACE"]))
        tracemalloc.take_snapshot().dump(base + ".snap")
        data["traced"] = 0
    with open(base + ".json", "w") as f:
        json.dump(data, f, default=str)
    open(base + ".done", "w").close()


def on_exec(signum, frame):
    """SIGUSR2: run the Python file MEMPROBE_EXEC in this process (an ad-hoc look),
    its output (print) to MEMPROBE_EXEC.out."""
    import contextlib
    import io
    import traceback

    path = os.environ["MEMPROBE_EXEC"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            exec(compile(open(path).read(), path, "exec"), {"__name__": "memprobe_exec"})
        except Exception:
            traceback.print_exc(file=out)
    with open(path + ".out", "w") as f:
        f.write(out.getvalue())


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGUSR2, on_exec)
    sys.argv[0] = "daphne"
    from realtime.server.launcher import main

    main()
