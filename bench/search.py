"""Search and history on PostgreSQL at size: the server time of a search
(GET /api/v1/search/'s selector, domain/search.py) over --messages messages, and of
a page of older history (`before`, selectors.room_messages) in a room that holds
them all. Part of `make bench` (bench/run.py, its own section); alone:

    python -m bench.search --messages 5000 --queries 50    # a private PostgreSQL
    python -m bench.search --database-url postgres://...   # an existing, empty one

Prints one JSON object: p50/p95/max milliseconds of each kind of call. The time is
the selector's in this process (query, rows, snippets: what the view adds is the
JSON encoding), each call on a warm connection, as a worker serves it.

The data: one public room of --messages messages (bodies of 3 to 30 words drawn
from a Zipf-like vocabulary, so some words are in a tenth of all messages and most
in a handful), and a private room of a tenth as many that the searching user is
not in, so the visibility filter has rows to exclude.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCABULARY = 5000


def words() -> list[str]:
    return [f"w{n}" for n in range(VOCABULARY)]


def body(rng: random.Random, vocabulary: list[str], weights: list[float]) -> str:
    return " ".join(rng.choices(vocabulary, weights, k=rng.randint(3, 30)))


def seed(messages: int, rng: random.Random) -> dict:
    """Users, the two rooms and their messages (COPY: a few seconds for 100,000)."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from realtime.models import Membership, Message, Room

    User = get_user_model()
    reader, _ = User.objects.get_or_create(username="bench-reader")
    writer, _ = User.objects.get_or_create(username="bench-writer")
    big, _ = Room.objects.get_or_create(slug="big", defaults={"title": "Big", "is_public": True})
    secret, _ = Room.objects.get_or_create(slug="secret", defaults={"title": "Secret", "is_public": False})
    Membership.objects.get_or_create(room=secret, user=writer, defaults={"role": "owner"})
    vocabulary = words()
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    table = Message._meta.db_table
    with connection.cursor() as cursor:
        raw = cursor.cursor
        sizes = ((big, messages), (secret, max(1, messages // 10)))
        with raw.copy(f"COPY {table} (room_id, author_id, body, client_id, seq, created_at) FROM STDIN") as copy:
            for room, count in sizes:
                for seq in range(1, count + 1):
                    copy.write_row((room.pk, writer.pk, body(rng, vocabulary, weights), f"{room.slug}-{seq}", seq,
                                    start + timedelta(seconds=seq)))
        cursor.execute(f"ANALYZE {table}")
    for room, count in sizes:
        Room.objects.filter(pk=room.pk).update(last_seq=count)
    return {"reader": reader, "vocabulary": vocabulary, "messages": messages}


def timed(call) -> float:
    began = time.perf_counter()
    call()
    return (time.perf_counter() - began) * 1000


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[max(0, round(0.95 * len(ordered)) - 1)], 2),
        "max_ms": round(ordered[-1], 2),
    }


def measure(data: dict, queries: int, rng: random.Random) -> dict:
    from realtime.domain import search, selectors

    user, vocabulary, messages = data["reader"], data["vocabulary"], data["messages"]
    # A mix of what people type: a common word, a rare one, two words, a phrase,
    # a word with an exclusion, and one that is in no message.
    kinds = [
        lambda: rng.choice(vocabulary[:10]),
        lambda: rng.choice(vocabulary[1000:]),
        lambda: f"{rng.choice(vocabulary[:50])} {rng.choice(vocabulary[:200])}",
        lambda: f'"{rng.choice(vocabulary[:20])} {rng.choice(vocabulary[:20])}"',
        lambda: f"{rng.choice(vocabulary[:30])} -{rng.choice(vocabulary[:30])}",
        lambda: "absent",
    ]
    for _ in range(5):  # warm the connection and the caches
        search.message_search(user=user, q=vocabulary[0])
    searches = [timed(lambda: search.message_search(user=user, q=rng.choice(kinds)()))
                for _ in range(queries)]
    second_pages = []
    for _ in range(max(1, queries // 5)):
        word = rng.choice(vocabulary[:10])
        first = search.message_search(user=user, q=word)
        if first["next"]:
            second_pages.append(timed(lambda: search.message_search(user=user, q=word, before=first["next"])))
    history = [timed(lambda: selectors.room_messages(user=user, slug="big", before=rng.randint(2, messages), limit=50))
               for _ in range(queries)]
    oldest = [timed(lambda: selectors.room_messages(user=user, slug="big", before=60, limit=50))
              for _ in range(max(1, queries // 5))]
    return {
        "messages": messages,
        "search": summary(searches),
        "search_next_page": summary(second_pages or [0.0]),
        "history_page": summary(history),
        "history_oldest_page": summary(oldest),
    }


def production_env(database_url: str) -> dict:
    """DEBUG off (no query log kept), as a worker runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "REALTIME_", "DATABASE_URL", "REDIS_URL"))}
    env.update({"DATABASE_URL": database_url, "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": os.urandom(24).hex(),
                "DJANGO_ALLOWED_HOSTS": "127.0.0.1", "DJANGO_ALLOWED_ORIGINS": "http://127.0.0.1",
                "DJANGO_LOG_LEVEL": "WARNING"})
    return env


def run_here(database_url: str, messages: int, queries: int, seed_value: int) -> dict:
    os.environ.update(production_env(database_url))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    rng = random.Random(seed_value)
    data = seed(messages, rng)
    return measure(data, queries, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--database-url", help="an empty PostgreSQL database (default: a private one)")
    args = parser.parse_args()
    server = None
    url = args.database_url
    if url is None:
        from deploy.cluster import PostgresServer

        server = PostgresServer().start()
        url = server.url
    try:
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=production_env(url),
                       check=True, stdout=subprocess.DEVNULL)
        result = run_here(url, args.messages, args.queries, args.seed)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
