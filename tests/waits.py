"""Waiting for a state with a deadline, for tests that watch other processes.

A state another process reaches (its name after a re-exec, its children, a
line in its log, a thread's CPU affinity) is read until it holds or a deadline
passes; it is never read once after a sleep, which fails whenever a busy
machine is slower than the sleep. The deadline only bounds a hang: it is no
speed limit, so it is generous."""
import time


def wait_until(pred, timeout, what, interval=0.02):
    """Calls pred() until it returns something true and returns that. After
    `timeout` seconds the test fails with a message naming `what` (a string,
    or a callable giving one, e.g. the tail of a log) and the last value pred
    gave. An OSError from pred (a /proc entry of a process that is starting or
    ending) counts as "not yet"; an AssertionError from it (say, the process
    under test died) fails at once."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = pred()
        except OSError as e:
            value = None
            last = f"{type(e).__name__}: {e}"
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            desc = what() if callable(what) else what
            raise AssertionError(f"waited {timeout:g} s for {desc}; last seen: {last!r}")
        time.sleep(interval)
