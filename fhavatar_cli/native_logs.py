"""Keep third-party native logs off the console (shown with ``--verbose``).

MediaPipe / TFLite (absl and glog: ``W0000 00:00:… inference_feedback_manager.cc:114] …``, ``INFO: Created
TensorFlow Lite XNNPACK delegate for CPU.``) and decord's ffmpeg (``[mov,mp4,… @ 0x…] moov atom not found``,
``[07:54:41] …/video_reader.cc:83: ERROR opening …``) write straight to file descriptor 2 from C++, some from threads,
so neither Python's ``sys.stderr`` nor the libraries' environment variables reach them (absl ignores
``GLOG_minloglevel`` before ``absl::InitializeLog``, which MediaPipe never calls). So fd 2 becomes a pipe, and a
thread forwards to the real stderr every line that is not one of those log formats; our own messages, tracebacks and
Python warnings go through ``sys.stderr``, re-opened on a copy of the real stderr, and never wait on the filter.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

# Lines in the log formats of the native libraries we load (everything else is passed through).
NATIVE_LOG = re.compile(
    rb"^(?:[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\]"  # absl / glog, info to error (F: fatal, kept)
    rb"|INFO: "  # TFLite's own logger
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|\[[^\]\n]* @ 0x[0-9a-f]+\] "  # ffmpeg's av_log, inside decord
    rb"|\[\d\d:\d\d:\d\d\] [^ ]+\.(?:cc|cpp|h):\d+: )"  # dmlc (decord)
)

_state: dict = {}


def silence_native_logs() -> bool:
    """Filter the native log lines out of fd 2 for the rest of the process; True when installed (idempotent).

    Not installed when stderr is not a real file descriptor (e.g. an in-process test runner captured it).
    """
    if _state:
        return True
    try:
        if sys.stderr.fileno() != 2:
            return False
        sys.stderr.flush()
        real = os.dup(2)
    except (AttributeError, OSError, ValueError):
        return False
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    old = sys.stderr
    sys.stderr = open(real, "w", buffering=1, encoding=old.encoding or "utf-8", errors="backslashreplace",
                      closefd=False)
    pump = threading.Thread(target=_forward, args=(read_end, real), name="native-log-filter", daemon=True)
    pump.start()
    _state.update(real=real, pump=pump)
    atexit.register(_restore)
    return True


def _forward(read_end: int, real: int) -> None:
    with open(read_end, "rb") as pipe:
        for line in pipe:
            if not NATIVE_LOG.match(line):
                os.write(real, line)


def _restore() -> None:
    """At exit: give fd 2 back (closing the pipe) and let the filter pass on what it still holds."""
    try:
        sys.stderr.flush()
        os.dup2(_state["real"], 2)
    except (OSError, ValueError):
        return
    _state["pump"].join(timeout=1.0)
