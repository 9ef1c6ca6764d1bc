"""`RUNME.py watch`: run the job when files arrive under its `path`, locally.

watchdog reports file events (inotify on Linux). FUSE and network mounts (/Volumes, /dbfs, NFS, SMB)
deliver no such events for changes made elsewhere, so there watchdog's polling observer compares
listings instead. Events are debounced: a burst of files (a study arriving) makes one run, started
once no event came for `debounce` seconds, or at the latest `max_wait` seconds after the first (a
steady stream of files must not hold the catalog back forever); runs never overlap, and events during a
run make one more. The first run starts at once (`catch_up`): files that arrived while nothing watched
are catalogued without waiting for the next event.
"""

from __future__ import annotations

import os
import signal
import threading
import time

# File systems that do not report changes made by other machines or processes through inotify.
POLLED_FS = ("fuse", "nfs", "cifs", "smb", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs")
POLLED_PREFIXES = ("/Volumes/", "/dbfs/", "/Workspace/")


class WatchError(ValueError):
    pass


def mount_type(path: str) -> str:
    """The file-system type of the mount holding `path` (from /proc/mounts; '' where unknown)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    point = parts[1].replace("\\040", " ")
                    inside = real == point or real.startswith(point.rstrip("/") + "/")
                    if inside and len(point) >= len(best):
                        best, kind = point, parts[2]
    except OSError:
        pass
    return kind


def hidden(relative: str) -> bool:
    """A path below the watched folder with a part starting with '.' (the folder itself is '.')."""
    return any(part.startswith(".") and part not in (".", "..") for part in relative.split(os.sep))


def needs_polling(path: str) -> bool:
    real = os.path.realpath(path)
    return real.startswith(POLLED_PREFIXES) or mount_type(real).startswith(POLLED_FS)


def watch(folder: str, run_once, echo=print, debounce: float = 5.0, max_runs: int | None = None,
          stop: threading.Event | None = None, polling: bool | None = None, poll_seconds: float = 10.0,
          max_wait: float | None = None, catch_up: bool = True) -> int:
    """Call run_once(stop_event) after each quiet burst of file events under `folder`, one run at a
    time, until Ctrl-C (or `max_runs`). Returns the number of runs."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    if not os.path.isdir(folder):
        raise WatchError(f"watch needs an existing folder as path, not {folder!r}")
    stop = stop or threading.Event()
    changed = threading.Condition()
    start = time.monotonic()
    state = {"first": start - debounce, "last": start - debounce, "pending": catch_up}
    max_wait = max(60.0, 12 * debounce) if max_wait is None else max_wait

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            if event.event_type in ("opened", "closed_no_write"):
                return  # reads, the job's own among them
            # a rename counts by where it lands (an uploader's .part renamed to its name)
            where = getattr(event, "dest_path", "") or event.src_path
            if hidden(os.path.relpath(where, folder)):
                return  # hidden files and folders: partial uploads, a receiver's .incoming
            with changed:
                now = time.monotonic()
                if not state["pending"]:
                    state["first"] = now
                state["last"], state["pending"] = now, True
                changed.notify_all()

    polling = needs_polling(folder) if polling is None else polling
    observer = PollingObserver(timeout=poll_seconds) if polling else Observer()
    observer.schedule(Handler(), folder, recursive=True)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: _stop(stop, changed))
    def due_in():  # seconds until a pending run is due (None: nothing pending); called holding `changed`
        if not state["pending"]:
            return None
        now = time.monotonic()
        return min(debounce - (now - state["last"]), max_wait - (now - state["first"]))

    runs = 0
    observer.start()
    how = f"polling every {poll_seconds:g} s" if polling else "file events"
    echo(f"watching {folder} ({how}); "
         f"a run starts {debounce:g} s after the last change; press Ctrl-C to stop")
    try:
        while not stop.is_set():
            with changed:
                while not stop.is_set():
                    wait = due_in()
                    if wait is not None and wait <= 0:
                        break
                    changed.wait(timeout=max(0.05, wait) if wait is not None else 1.0)
                if stop.is_set():
                    break
                state["pending"] = False
            runs += 1
            why = "catching up with files that came while nothing watched" if runs == 1 and catch_up else \
                f"files changed under {folder}"
            echo(f"run {runs}: {why}")
            echo(f"run {runs} ended: {run_once(stop)}")
            if max_runs is not None and runs >= max_runs:
                break
    finally:
        observer.stop()
        observer.join(timeout=10)
        for sig, h in handlers.items():
            signal.signal(sig, h)
    echo(f"watch stopped after {runs} run(s)")
    return runs


def _stop(stop: threading.Event, changed: threading.Condition) -> None:
    stop.set()
    with changed:
        changed.notify_all()
