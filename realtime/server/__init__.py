"""Our daphne launcher (`python -m realtime.server [daphne arguments]`): daphne with
a graceful drain, bounded buffers each way, guarded HTTP connections and a lean
socket. See launcher.py."""
