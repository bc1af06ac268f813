"""The broker engines under the per-worker fan-out, one module each (the table in
delivery/transport.py)."""
