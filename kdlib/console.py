"""What a job prints, where its full log goes, and how it stops on Ctrl-C.

The console is for people: kdlib's own lines (a stage's start and end, progress, one line per epoch, the
final tables) on stdout, and errors on stderr. Ray's driver logs, every Ray worker's output as the driver
receives it and the native messages of Ray's core go to the run folder's `run.log` only, unless the run is
verbose (`--verbose`, `ray.verbose: true`): then Ray prints them as it always does. `run.log` always holds
everything, the console's lines included; with a remote storage root it is written locally and uploaded
when the run ends.

    with run_log(run_dir, verbose=cfg.ray.verbose) as log, on_interrupt("finished stages stay cached"):
        init_ray(...)          # after run_log: Ray's own start-up lines go to run.log too
        log("[run] ...")
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from kdlib import storage

RUN_LOG = "run.log"
LOGGER = "kdlib"  # kdlib's console lines; RunContext.log is its `info`
RAY_WORKER_PRINTER = "ray_print_logs"  # the name under which `ray.init` registers its printer of worker output
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s -- %(message)s"

_active: _RunLog | None = None  # the run log of this process while a `run_log` block runs


class _LockedFile:
    """The open run.log, written whole lines at a time from any thread (driver, Ray's log thread)."""

    def __init__(self, f):
        self.f, self.lock = f, threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            self.f.write(text)

    def flush(self) -> None:
        with self.lock:
            self.f.flush()


class _Tee(io.TextIOBase):
    """sys.stdout / sys.stderr during a run: what the driver prints reaches the console and run.log."""

    def __init__(self, console, file: _LockedFile):
        self.console, self.file = console, file

    def write(self, text: str) -> int:
        self.file.write(text)  # first: a Ctrl-C between the two writes costs the console the line, not run.log
        self.console.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self):
        return self.console.encoding

    @property
    def errors(self):
        return self.console.errors


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted (a test's capture, the run's tee)."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stdout


def _writes_to_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


def _console_handler(h: logging.Handler) -> bool:
    return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)


def _worker_output_prefix(data: dict) -> str:
    """`(TrainController pid=12, ip=192.0.2.7)`, as Ray prefixes a worker's lines on the driver's console."""
    who = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = f", ip={ip}" if ip and ip != data.get("localhost") else ""
    return f"({who + ' ' if who else ''}pid={data.get('pid')}{where})"


class _RunLog:
    def __init__(self, run_dir: str, verbose: bool):
        self.run_dir, self.verbose = run_dir, verbose
        self.undo = contextlib.ExitStack()
        self.ray_printers: list = []  # Ray's printers of worker output taken off the console (restored at the end)
        self.file: _LockedFile | None = None

    # -- setup ------------------------------------------------------------------------------------------------
    def open(self) -> Callable[[str], None]:
        target = storage.child(self.run_dir, RUN_LOG)
        if storage.is_local(target):
            path = Path(storage.filesystem(target)[1])
            path.parent.mkdir(parents=True, exist_ok=True)
        else:  # a local file, uploaded at the end; earlier attempts' log is kept above this one
            path = Path(tempfile.mkdtemp(dir=storage.local_cache_dir(), prefix=".run-log-")) / RUN_LOG
            if storage.exists_at(target):
                path.write_text(storage.read_text_at(target), encoding="utf-8")
            self.undo.callback(_upload, path, target)
        f = self.undo.enter_context(open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace"))
        self.file = _LockedFile(f)
        self.file.write(f"==== {datetime.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}: "
                        f"{' '.join(sys.argv)}{' (verbose)' if self.verbose else ''}\n")
        if not self.verbose:
            self._native_stderr_to_file(f)
        self._tee_std_streams()
        log = self._kdlib_logger()
        self._python_logs_to_file()
        if not self.verbose:
            self._worker_output_to_file()
        return log

    def _native_stderr_to_file(self, f) -> None:
        """Ray's core (C++) writes its warnings to file descriptor 2: it goes to run.log, while Python's
        sys.stderr keeps writing to the console (through a copy of the original descriptor when it wrote to
        descriptor 2; a caller's own sys.stderr, such as a test's capture, stays as it is)."""
        sys.stderr.flush()
        saved = os.dup(2)
        terminal = None
        if _writes_to_fd(sys.stderr, 2):
            terminal = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace",
                                 encoding=getattr(sys.stderr, "encoding", None) or "utf-8")
        original = sys.stderr
        os.dup2(f.fileno(), 2)
        sys.stderr = terminal or original

        def restore():
            sys.stderr = original
            if terminal is not None:
                terminal.close()
            os.dup2(saved, 2)
            os.close(saved)

        self.undo.callback(restore)

    def _tee_std_streams(self) -> None:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, self.file), _Tee(err, self.file)

        def restore():
            for tee in (sys.stdout, sys.stderr):
                tee.flush()
            sys.stdout, sys.stderr = out, err

        self.undo.callback(restore)

    def _kdlib_logger(self) -> Callable[[str], None]:
        logger = logging.getLogger(LOGGER)
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        saved = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # its lines reach run.log through the stdout tee, once

        def restore():
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]

        self.undo.callback(restore)
        return logger.info

    def _python_logs_to_file(self) -> None:
        """Ray's loggers (`ray`, `ray.data`, ...) print to the console through their own handlers (on the
        stderr of when Ray was imported, not through the tee): run.log gets a handler of its own on each,
        and a quiet run takes theirs off. Other libraries' records reach run.log through the root logger; a
        quiet run sends Python's warnings there too, a verbose one keeps warnings on the console."""
        to_file = logging.StreamHandler(self.file)
        to_file.setLevel(logging.INFO)  # what the console handlers would have shown (Ray Data logs DEBUG too)
        to_file.setFormatter(logging.Formatter(_FILE_FORMAT))
        root = logging.getLogger()
        root_level, root_handlers = root.level, [to_file]
        if self.verbose:  # the console keeps what Python's last-resort handler would have printed
            console = logging.StreamHandler(sys.stderr.console if isinstance(sys.stderr, _Tee) else sys.stderr)
            console.setLevel(logging.WARNING)
            root_handlers.append(console)
        else:
            logging.captureWarnings(True)
        for h in root_handlers:
            root.addHandler(h)
        root.setLevel(logging.INFO)
        swapped = []
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if (name == "ray" or name.startswith("ray.")) and isinstance(logger, logging.Logger) \
                    and not logger.propagate:
                console = [] if self.verbose else [h for h in logger.handlers if _console_handler(h)]
                for h in console:
                    logger.removeHandler(h)
                logger.addHandler(to_file)
                swapped.append((logger, console))
        transformers_bars = None if self.verbose else _transformers_progress_bars(False)

        def restore():
            for logger, console in swapped:
                logger.removeHandler(to_file)
                for h in console:
                    logger.addHandler(h)
            if not self.verbose:
                logging.captureWarnings(False)
                _transformers_progress_bars(transformers_bars)
            for h in root_handlers:
                root.removeHandler(h)
            root.setLevel(root_level)

        self.undo.callback(restore)

    def _worker_output_to_file(self) -> None:
        """What Ray forwards of every worker's stdout and stderr (log_to_driver) is written to run.log; Ray's
        own printer of it is taken off the console (now, or when Ray starts: `ray_started`)."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import filter_autoscaler_events

        def write(data: dict) -> None:
            lines = data.get("lines", [])
            if data.get("pid") == "autoscaler":  # its events, not the status it logs every few seconds (as Ray does)
                lines = list(filter_autoscaler_events(lines))
            prefix = _worker_output_prefix(data)
            self.file.write("".join(f"{prefix} {line}\n" for line in lines))

        dispatcher.add_handler("kdlib_run_log", write)
        self.ray_printers = self._take_ray_printer()  # an in-process caller's Ray: given back at the end

        def restore():
            dispatcher.remove_handler("kdlib_run_log")
            for printer in self.ray_printers:  # the console gets worker output again, as before the run
                dispatcher.add_handler(RAY_WORKER_PRINTER, printer)

        self.undo.callback(restore)

    def ray_started(self) -> None:
        """Ray started inside the run (`ray.init` registered its printer): the printer goes, for good. The run
        ends with the job, and what Ray still delivers while it shuts down stays off the console."""
        if not self.verbose:
            self._take_ray_printer()

    @staticmethod
    def _take_ray_printer() -> list:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        printers = [h for n, h in list(dispatcher.handlers) if n == RAY_WORKER_PRINTER]
        dispatcher.remove_handler(RAY_WORKER_PRINTER)
        return printers

    # -- teardown -----------------------------------------------------------------------------------------------
    def close(self, exc: BaseException | None) -> None:
        if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            # Python prints the traceback once the job has returned; run.log gets it here.
            self.file.write("".join(traceback.format_exception(exc)))
        self.undo.close()


def _transformers_progress_bars(enabled: bool) -> bool:
    """Turn the driver's transformers progress bars (weight loading) on or off; returns the previous state."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return enabled
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    return before


def _upload(path: Path, target: str) -> None:
    storage.write_text_at(target, path.read_text(encoding="utf-8"))
    path.unlink()
    path.parent.rmdir()


@contextlib.contextmanager
def run_log(run_dir: str, *, verbose: bool = False) -> Iterator[Callable[[str], None]]:
    """Console and `<run_dir>/run.log` for the block; yields the function that prints kdlib's lines (the
    stages' `RunContext.log`). Everything is put back as it was at the end (in-process callers: tests,
    benchmarks)."""
    global _active
    if _active is not None:  # a job called from a job (benchmarks): the outer run's log holds it all
        yield logging.getLogger(LOGGER).info
        return
    run = _RunLog(run_dir, verbose)
    try:
        log = run.open()
    except BaseException:
        run.undo.close()
        raise
    _active = run
    exc = None
    try:
        yield log
    except BaseException as e:
        exc = e
        raise
    finally:
        _active = None
        run.close(exc)


def ray_started() -> None:
    """Called by kdlib.cluster.init_ray after `ray.init`: a quiet run keeps Ray's worker output off the console."""
    if _active is not None:
        _active.ray_started()


INTERRUPTED = 130  # a job's exit status after Ctrl-C: 128 + SIGINT, as a shell reports a process it ended
RESUME = "run the same command again to resume"


def interrupted_line(kept: str, then: str = RESUME) -> str:
    """The one line a job prints when Ctrl-C stops it: what was kept, what to do next."""
    return f"interrupted: {kept}; {then}"


@contextlib.contextmanager
def on_interrupt(kept: str, then: str = RESUME) -> Iterator[None]:
    """Ctrl-C ends the block with one line (`interrupted_line`) and exit status 130, not a KeyboardInterrupt
    traceback. A second Ctrl-C while Ray shuts down ends the process at once."""
    try:
        yield
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(interrupted_line(kept, then), file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED) from None
