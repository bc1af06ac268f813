"""Shared state between workers: a Redis client per event loop (redis-py's asyncio
pools are bound to the loop that made them), or nothing without REDIS_URL."""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import math
import time
import weakref

from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout

# Per loop (a closed loop's clients go with it; tests run a loop per test), per URL and use.
_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, bool], object]]" = weakref.WeakKeyDictionary()


def redis_url() -> str:
    return getattr(settings, "REDIS_URL", "")


TIMEOUT = 2  # s: a connect, a read, a Batched round trip whole (the callers fail open or closed)


def client(url: str, *, batches: bool = False):
    """The asyncio Redis client for `url` on the running loop. Short timeouts: the
    callers fail open (or closed) on their own rather than wait for a sick Redis.
    With `batches`, Batched's own: its reads have no timeout each, as Batched
    times each round trip whole."""
    from redis import asyncio as aioredis

    mine = _clients.setdefault(asyncio.get_running_loop(), {})
    found = mine.get((url, batches))
    if found is None:
        found = mine[(url, batches)] = packed_in_c(aioredis.from_url(
            url, socket_connect_timeout=TIMEOUT, socket_timeout=None if batches else TIMEOUT), quiet=not batches)
    return found


# -- a Redis that does not answer is not asked again at once --------------------------
# A Redis that hangs (paused, or its network gone silent) answers nothing and refuses
# nothing: each command waited TIMEOUT, and a socket's frames, handled one after the
# other, each waited for theirs (a message sent after four other frames was acknowledged
# 14 s late in a first real use). When a second command to a Redis gets no answer
# within TIMEOUT less than QUIET seconds after a first, that Redis's commands fail at
# once, for QUIET seconds, with Unanswered (a ConnectionError: the callers do what
# realtime/state/degraded.py says for Redis away); those sent after that ask it again.
# One timeout alone (a slow command, one dead connection) quiets nothing: a quiet
# Redis fails publishes and presence too, which a healthy one should not. A refused
# connection fails at once by itself and changes nothing here.
QUIET = 5.0
# (event loop, Redis address) -> until when (time.monotonic) its commands fail at once
_quiet_until: dict[tuple[asyncio.AbstractEventLoop, object], float] = {}
# (event loop, Redis address) -> when a command to it last had no answer in time
_unanswered_at: dict[tuple[asyncio.AbstractEventLoop, object], float] = {}


class Unanswered(RedisConnectionError):
    """Not sent: this Redis did not answer within TIMEOUT a moment ago."""


def address_of(options: dict) -> object:
    """The Redis a connection's options reach: its socket path, or host and port
    (redis-py's defaults where a URL names none, as its connections take them)."""
    return options.get("path") or (options.get("host") or "localhost", int(options.get("port") or 6379))


def no_answer(address: object) -> None:
    """A command to `address` got no answer within TIMEOUT: the second within QUIET
    seconds makes it quiet."""
    now = time.monotonic()
    # (and those of loops gone: tests run a loop each)
    for key in [key for key, until in _quiet_until.items() if until <= now or key[0].is_closed()]:
        del _quiet_until[key]
    for key in [key for key, at in _unanswered_at.items() if at + QUIET <= now or key[0].is_closed()]:
        del _unanswered_at[key]
    key = (asyncio.get_running_loop(), address)
    if key in _unanswered_at:
        _quiet_until[key] = now + QUIET
    _unanswered_at[key] = now


def still_quiet(address: object) -> bool:
    """Whether `address` went quiet less than QUIET seconds ago (on this loop)."""
    key = (asyncio.get_running_loop(), address)
    until = _quiet_until.get(key)
    if until is None:
        return False
    if time.monotonic() < until:
        return True
    del _quiet_until[key]
    return False


def refuse_if_quiet(address: object) -> None:
    """Raise Unanswered if `address` is quiet. (Its callers ask only while some
    Redis is, `if _quiet_until`: a command to a Redis that answers looks up nothing.)"""
    if still_quiet(address):
        raise Unanswered(f"Redis at {address} gave no answer within {TIMEOUT} s; not asked again for {QUIET} s")


class _Quiet:
    """A connection's side of it (mixed into the shared client's connection class):
    nothing sent to a quiet Redis, and a connect, a write or a read with no answer in
    time counts."""

    async def connect(self):
        if _quiet_until:
            refuse_if_quiet(address_of(self.__dict__))
        try:
            return await super().connect()
        except (TimeoutError, RedisTimeout):
            no_answer(address_of(self.__dict__))
            raise

    async def send_packed_command(self, command, check_health=True):
        if _quiet_until:
            refuse_if_quiet(address_of(self.__dict__))
        try:
            return await super().send_packed_command(command, check_health)
        except (TimeoutError, RedisTimeout):
            no_answer(address_of(self.__dict__))
            raise

    async def read_response(self, *args, **kwargs):
        try:
            return await super().read_response(*args, **kwargs)
        except (TimeoutError, RedisTimeout):
            no_answer(address_of(self.__dict__))
            raise


_packed_classes: dict[tuple[type, bool, bool], type] = {}
# What hiredis packs: exactly these types (a subclass, an enum, a memoryview go the
# Python way, as before), and text or bytes up to this long (beyond about 32 KB
# hiredis's copy costs more than the Python packer's chunks).
_C_TYPES = frozenset((str, bytes, int, float))
_C_LONGEST = 16384


def packed_in_c(client, quiet: bool = False):
    """`client` with its commands packed into the wire format by hiredis (C), as
    redis-py's synchronous connections already do when hiredis is installed; its
    asyncio connections pack in Python (redis-py 7.4): about 7 µs a command of a
    connect storm's against 2 (docs/decisions.md). Only where the bytes are the
    same: str, bytes, int and float under the default encoding (UTF-8, strict);
    anything else, and long values, are packed as before. With `quiet`, a Redis
    that does not answer in time is not asked again for a while (QUIET, above)."""
    from redis.connection import HIREDIS_AVAILABLE

    pool = client.connection_pool
    options = pool.connection_kwargs
    default_encoding = (codecs.lookup(options.get("encoding", "utf-8")).name == "utf-8"
                        and options.get("encoding_errors", "strict") == "strict" and "encoder_class" not in options)
    in_c = HIREDIS_AVAILABLE and default_encoding
    if in_c or quiet:
        pool.connection_class = _connection_class(pool.connection_class, in_c, quiet)
    return client


def _connection_class(base: type, in_c: bool, quiet: bool) -> type:
    made = _packed_classes.get((base, in_c, quiet))
    if made is not None:
        return made
    namespace = {}
    if in_c:
        from redis.connection import HiredisRespSerializer

        pack = HiredisRespSerializer().pack

        def pack_command(self, *args):
            for arg in args:
                kind = type(arg)
                if kind not in _C_TYPES or (kind is str or kind is bytes) and len(arg) > _C_LONGEST:
                    return base.pack_command(self, *args)
            return pack(*args)

        namespace["pack_command"] = pack_command
    name = ("CPacked" if in_c else "") + ("Quiet" if quiet else "") + base.__name__
    made = _packed_classes[(base, in_c, quiet)] = type(name, (_Quiet, base) if quiet else (base,), namespace)
    return made


class _Waiting:
    __slots__ = ("calls", "sender")

    def __init__(self) -> None:
        self.calls: list = []  # (command args, future)
        self.sender: asyncio.Task | None = None


class Batched:
    """Redis commands that wait together go together: the first is sent at once,
    alone; those asked for while it is on its way are sent next as one pipeline, on
    one connection, in one round trip. A client of redis-py otherwise takes a
    connection of its own for each command in flight: a storm of 200 handshakes at
    a time, each with its rate limits, lease and presence to ask, opened hundreds
    of connections (their set-up a tenth of the worker's time) and paid a round trip
    each. Each caller gets its own command's answer, or its error, as from the
    client itself; a connection that fails fails the commands sent on it. A
    caller cancelled before its command is sent is left out.

    A round trip is written and read here, on one of the client's connections,
    rather than through redis-py's Pipeline, whose layers (a retry wrapper, a
    timeout and a response callback for every command) cost a storm's worker
    more than the rest of the trip (docs/decisions.md, "A storm's Redis round
    trips"); the whole trip has one timeout. A script (`eval`) is sent by its
    SHA1 once Redis has run it from here, not its text every time; a Redis that
    has forgotten it (restarted, SCRIPT FLUSH) answers NOSCRIPT, and the command
    goes again with the text, ahead of the next batch (so after the commands
    sent with it the first time)."""

    MOST = 256

    def __init__(self, url: str) -> None:
        self.url = url
        self._waiting = LoopLocal(_Waiting)
        self._loaded: dict[str, str] = {}  # script text: its SHA1, once Redis has it
        self._at: object = None  # the Redis it reaches (address_of)

    def eval(self, *args) -> asyncio.Future:
        return self.execute_command("EVAL", *args)

    def execute_command(self, *args) -> asyncio.Future:
        """The command's answer, to await: a future, not a coroutine around one
        (a frame less to resume for each of a storm's commands). A caller
        cancelled while it awaits cancels the future, and the command is not sent
        if it has not gone yet."""
        waiting = self._waiting()
        future = asyncio.get_running_loop().create_future()
        if _quiet_until:
            try:
                refuse_if_quiet(self._address())
            except Unanswered as exc:
                future.set_exception(exc)
                return future
        waiting.calls.append((args, future))
        if waiting.sender is None:
            waiting.sender = asyncio.ensure_future(self._send(waiting))
        return future

    def _address(self) -> object:
        if self._at is None:
            self._at = address_of(client(self.url, batches=True).connection_pool.connection_kwargs)
        return self._at

    def _encoding(self) -> tuple[str, str]:
        options = client(self.url, batches=True).connection_pool.connection_kwargs
        return options.get("encoding", "utf-8"), options.get("encoding_errors", "strict")

    def _wire(self, args: tuple) -> tuple:
        """The command as sent: a script Redis has already run, by its SHA1."""
        if args[0] == "EVAL":
            sha = self._loaded.get(args[1])
            if sha is not None:
                return ("EVALSHA", sha, *args[2:])
        return args

    async def _round_trip(self, commands: list[tuple]) -> list:
        """The answers to `commands`, in order, in one write and its reads; an
        error answer is returned in its place (an exception). A trip that fails
        (the connection, or no answer within TIMEOUT) raises for all of them, and
        is not tried again: the callers fail open or closed as with Redis away
        (redis-py's Pipeline retried, and could run a command twice)."""
        from redis.exceptions import ResponseError

        redis = client(self.url, batches=True)
        pool, callbacks = redis.connection_pool, redis.response_callbacks
        connection = None
        try:
            async with asyncio.timeout(TIMEOUT):
                # (inside the timeout: a new connection's set-up, AUTH, SELECT and
                # CLIENT SETINFO, reads its answers with no timeout of its own)
                connection = await pool.get_connection()
                pack = connection.pack_command
                await connection.send_packed_command([chunk for args in commands for chunk in pack(*args)],
                                                     check_health=False)
                read, answers = connection.read_response, []
                for args in commands:
                    try:
                        answer = await read()
                    except ResponseError as exc:  # (the answer: read whole, nothing else pending)
                        answers.append(exc)
                        continue
                    # As the client answers it (SET: True); none for EVAL, EVALSHA.
                    callback = callbacks.get(args[0])
                    answers.append(answer if callback is None else callback(answer))
                return answers
        except BaseException as exc:
            if connection is not None:
                # Answers may still be on their way: closed, and made again when next taken.
                await connection.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                no_answer(self._address())
                raise RedisTimeout(f"No answer from Redis within {TIMEOUT} s") from None
            raise
        finally:
            if connection is not None:
                await pool.release(connection)

    async def _send(self, waiting: _Waiting) -> None:
        from redis.exceptions import NoScriptError

        batch: list = []
        try:
            while waiting.calls:
                # A caller cancelled while it waited (its socket went away) is not
                # sent: its rate-limit token, lease or presence would be taken for
                # nobody, and a storm's abandoned handshakes would cost as much as live ones.
                live = [call for call in waiting.calls if not call[1].done()]
                batch, waiting.calls = live[:self.MOST], live[self.MOST:]
                if not batch:
                    break
                commands = [self._wire(args) for args, _ in batch]
                try:
                    if _quiet_until:  # (it went quiet while these waited for the trip before)
                        refuse_if_quiet(self._address())
                    answers = await self._round_trip(commands)
                except Exception as exc:
                    answers = [exc] * len(batch)
                again = []
                for (args, future), sent, answer in zip(batch, commands, answers):
                    if isinstance(answer, NoScriptError) and sent[0] == "EVALSHA" and args[0] == "EVAL":
                        self._loaded.pop(args[1], None)
                        again.append((args, future))  # with its text, next
                        continue
                    if sent[0] == "EVAL" and not isinstance(answer, Exception):
                        self._loaded[args[1]] = sha1(args[1], self._encoding())
                    if future.done():
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
                waiting.calls[:0] = again
        finally:
            waiting.sender = None
            # Cancelled (the loop is closing): no answer will come for these.
            for _, future in batch + waiting.calls:
                future.cancel()
            waiting.calls = []


def sha1(script, encoding: tuple[str, str] = ("utf-8", "strict")) -> str:
    """A script's SHA1 as Redis names it (EVALSHA): of its bytes as the client
    sends them (`encoding`: the URL's encoding and its errors)."""
    return hashlib.sha1(script.encode(*encoding) if isinstance(script, str) else script).hexdigest()


_batched: dict[str, Batched] = {}


def batched(url: str) -> Batched:
    """The Batched commands of `url` (module doc of Batched)."""
    found = _batched.get(url)
    if found is None:
        found = _batched[url] = Batched(url)
    return found


RENEW_CHUNK = 500  # members one ZADD of renew_scores sets at most


async def renew_scores(url: str, entries: list[tuple[str, str]], ttl: float, *, now: float | None = None,
                       only_existing: bool = False, key_ttl: float | None = None,
                       also_kept: dict[str, tuple[str, ...]] | None = None) -> None:
    """Set each (sorted-set key, member) to expire `ttl` seconds from `now` (the
    caller's clock; time.time() by default), all in one round trip (the leases kept
    as sorted sets scored by expiry). One ZADD a key, of up to RENEW_CHUNK
    members, rather than one an entry: the commands of a renewal are what the
    pipeline holds until it is sent, and 10,000 sockets of one room were 10,000
    of them (some 5 MiB of the worker's heap, which it keeps); now 20. With
    `only_existing`, a member that is gone stays gone; with `key_ttl`, each key
    is kept that long, and with it the keys `also_kept` names for it."""
    if not entries:
        return
    members: dict[str, list[str]] = {}
    for key, member in entries:
        members.setdefault(key, []).append(member)
    pipe = client(url).pipeline(transaction=False)
    expiry = (time.time() if now is None else now) + ttl
    for key, names in members.items():
        for start in range(0, len(names), RENEW_CHUNK):
            pipe.zadd(key, dict.fromkeys(names[start:start + RENEW_CHUNK], expiry), xx=only_existing)
    if key_ttl is not None:
        for key in members:
            for kept in (key, *(also_kept or {}).get(key, ())):
                pipe.expire(kept, math.ceil(key_ttl))
    await pipe.execute()


class Chooser:
    """The Redis implementation of something when REDIS_URL is set, the in-memory
    one otherwise; made again when the URL changes (tests switch it)."""

    def __init__(self, redis_cls, memory_cls) -> None:
        self.redis_cls, self.memory_cls = redis_cls, memory_cls
        self.made = None
        self.url: str | None = None

    def __call__(self):
        url = redis_url()
        if self.made is None or self.url != url:
            self.made = self.redis_cls(url) if url else self.memory_cls()
            self.url = url
        return self.made

    def reset(self) -> None:
        self.made = None


def retrieved(future: asyncio.Future) -> None:
    """A done callback for a future whose error may be nobody's to read (a reply
    nobody waits for any more, a shared read whose askers all went away, a publish
    whose caller was cancelled): read here, not logged as never retrieved."""
    if not future.cancelled():
        future.exception()


class LoopLocal:
    """One value per running event loop, made by `factory` on first use there: for
    state whose timers and tasks belong to a loop (tests run a loop per test, and a
    closed loop's value goes with it)."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.values: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, object]" = weakref.WeakKeyDictionary()

    def __call__(self):
        loop = asyncio.get_running_loop()
        found = self.values.get(loop)
        if found is None:
            found = self.values[loop] = self.factory()
        return found


_started: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[str]]" = weakref.WeakKeyDictionary()


def start_once(name: str, factory) -> None:
    """Run `factory()` (a coroutine that loops for ever) once per event loop:
    a process-wide background task such as the heartbeat or the presence sweep.
    Keyed by the loop itself, not its id: a closed loop's id can be reused by the
    next one (tests run a loop per test), which would then get no task."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        # daphne's start-up hooks run before Twisted's asyncio loop is running.
        loop = asyncio.get_event_loop()
    names = _started.setdefault(loop, set())
    if name in names:
        return
    names.add(name)
    asyncio.ensure_future(factory(), loop=loop)
