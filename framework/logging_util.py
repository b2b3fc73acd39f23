"""Caffe/glog-style log lines through Python's ``logging``.

Caffe logs through glog, whose lines look like::

    I1123 19:24:00.123456 12345 solver.cpp:228] Iteration 100, loss = 0.123

(severity letter, month+day, wall time with microseconds, thread id,
source file:line, then the message).  Log parsers (Caffe's
``tools/extra/parse_log.py`` and friends) match the message parts, and some
read the time from the prefix, so the framework keeps both.

The framework's modules log to ``logging.getLogger("framework.<module>")``
and never configure handlers themselves; command-line tools call
:func:`init_logging` once.  Numbers are printed as C++ streams print them
(:func:`fmt`: six significant digits, like ``%g``).

A progress bar (:class:`ProgressBar`) is drawn only when the stream is a
terminal; the handler erases it before writing a log line and redraws it after,
so log lines stay whole and parsable.
"""
import logging
import os
import sys
import threading
import time

LOGGER_NAME = "framework"

_LEVEL_LETTERS = {logging.DEBUG: "D", logging.INFO: "I", logging.WARNING: "W",
                  logging.ERROR: "E", logging.CRITICAL: "F"}


def get_logger(name=None):
    """The framework logger, or its child ``framework.<name>``."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def fmt(value):
    """Format a number as C++'s ``ostream << value`` does (default precision 6, like ``%g``)."""
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    try:
        return format(float(value), "g")
    except (TypeError, ValueError):
        return str(value)


class CaffeFormatter(logging.Formatter):
    """glog's line prefix: ``Lmmdd hh:mm:ss.uuuuuu tid file:line] message``.

    Multi-line messages keep the prefix on the first line only, as glog does.
    """

    def format(self, record):
        letter = _LEVEL_LETTERS.get(record.levelno, "I")
        t = time.localtime(record.created)
        micros = int((record.created - int(record.created)) * 1e6)
        stamp = time.strftime("%m%d %H:%M:%S", t)
        tid = record.process if record.process is not None else os.getpid()  # glog: the thread id
        prefix = f"{letter}{stamp}.{micros:06d} {tid:5d} {record.filename}:{record.lineno}] "
        message = record.getMessage()
        if record.exc_info:
            message = message + "\n" + self.formatException(record.exc_info)
        return prefix + message


class _ProgressAwareHandler(logging.StreamHandler):
    """A StreamHandler that erases and redraws an active progress bar around each record."""

    def emit(self, record):
        bar = ProgressBar.active
        if bar is not None and bar.stream is self.stream:
            with bar.lock:
                bar.erase()
                super().emit(record)
                bar.draw()
        else:
            super().emit(record)


_installed_handler = None


def init_logging(level=logging.INFO, stream=None):
    """Send framework log records to ``stream`` (stderr) with Caffe's line format.

    Installs one handler on the root logger (tools own the process) and
    returns it; calling again replaces the previous handler.
    """
    global _installed_handler
    root = logging.getLogger()
    if _installed_handler is not None:
        root.removeHandler(_installed_handler)
    handler = _ProgressAwareHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(CaffeFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    get_logger().setLevel(level)
    _installed_handler = handler
    return handler


class ProgressBar:
    """A one-line ``[#####     ] 120/2000`` bar on a terminal; a no-op elsewhere.

    Use as a context manager; call :meth:`update(n)` with the current count.
    """

    active = None

    def __init__(self, total, start=0, stream=None, width=30, label="iter"):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(total) and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.count, self.width, self.label = int(total), int(start), width, label
        self.lock = threading.RLock()
        self._shown = False

    def __enter__(self):
        if self.enabled:
            ProgressBar.active = self
            with self.lock:
                self.draw()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            with self.lock:
                self.erase()
            ProgressBar.active = None
        return False

    def update(self, count):
        self.count = int(count)
        if self.enabled:
            with self.lock:
                self.draw()

    def draw(self):
        if not self.enabled:
            return
        frac = min(max(self.count / self.total, 0.0), 1.0) if self.total else 1.0
        filled = int(round(frac * self.width))
        self.stream.write(f"\r[{'#' * filled}{' ' * (self.width - filled)}] "
                          f"{self.count}/{self.total} {self.label}")
        self.stream.flush()
        self._shown = True

    def erase(self):
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False
