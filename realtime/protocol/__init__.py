"""Protocol v1: every frame type declared once, with its codecs, error and close codes.

One msgspec Struct per frame gives validation (unknown fields are refused), the JSON
and MessagePack codecs, and the JSON Schema that docs/protocol.md is generated from.
This package imports nothing of the app, so clients, tests and tools can use it alone.

It is one module to its users (`from realtime import protocol`): codes.py (the path,
subprotocols, error and close codes), frames.py (every frame's schema), codecs.py
(JSON and MessagePack, the stored form of events, the JSON Schema, prebuilt frames).
"""

from realtime.protocol.codes import *  # noqa: F401,F403
from realtime.protocol.frames import *  # noqa: F401,F403
from realtime.protocol.codecs import *  # noqa: F401,F403
