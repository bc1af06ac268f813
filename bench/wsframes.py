"""The server's side of a WebSocket as the load generators read it off the wire
(bench/loadgen.py's members, bench/drain.py's clients): frames unmasked, RFC 6455
5.2; what they send back is masked with a zero key, which leaves it as it is."""

from __future__ import annotations

from collections.abc import Iterator

EIO_PING, EIO_PONG = "2", "3"  # Engine.IO 4's ping from the server (a Socket.IO target), and its answer


def read_frames(buf: bytearray) -> Iterator[tuple[int, bytes]]:
    """(opcode, payload) of each whole frame at the head of `buf`, taken off it as
    it is yielded; a partial frame stays for the next read."""
    while len(buf) >= 2:
        opcode, n, start = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return
            n, start = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                return
            n, start = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < start + n:
            return
        payload = bytes(buf[start:start + n])
        del buf[:start + n]
        yield opcode, payload


def short_frame(opcode: int, payload: bytes) -> bytes:
    """A whole client frame of under 126 bytes (masked, with the zero key)."""
    return bytes((0x80 | opcode, 0x80 | len(payload))) + bytes(4) + payload


def pong(payload: bytes) -> bytes:
    """The answer to a ping (a control frame: its payload is under 126 bytes)."""
    return short_frame(0xA, payload)


EIO_PONG_FRAME = short_frame(0x1, EIO_PONG.encode())


def reply(opcode: int, payload: bytes) -> bytes | None:
    """What a member sends back for a server frame: a pong for a ping (and for a
    Socket.IO target's Engine.IO ping), None for anything else."""
    if opcode == 9:
        return pong(payload)
    if opcode == 1 and payload == b"2":
        return EIO_PONG_FRAME
    return None
