"""The pure core's receive lock: ``threading.Lock``'s contract, at half its cost uncontended."""
import threading


class RecvLock:
    """A lock like ``threading.Lock`` (not reentrant), also a context manager.

    ``free`` holds one token while the lock is free: taking it with ``free.pop()`` (IndexError:
    held) and giving it back with ``free.append(True)`` are each one atomic call, half the
    instructions of ``Lock.acquire`` / ``release`` (callgrind). The Fastpath does both inline;
    whoever gives the token back must then call ``wake()`` if ``waiters`` is not zero.

    A thread that finds the token gone waits on a condition: it counts itself in ``waiters``
    before it tries again, so a holder that gives the token back after that try sees the count
    and wakes it; every waiter, woken or not, tries again before it sleeps.
    """

    __slots__ = ("free", "waiters", "_cond")

    def __init__(self):
        self.free = [True]
        self.waiters = 0
        self._cond = threading.Condition(threading.Lock())

    def acquire(self):
        """Wait for the lock (signal handlers run meanwhile, and may raise); True."""
        try:
            self.free.pop()
            return True
        except IndexError:
            pass
        with self._cond:
            self.waiters += 1
            try:
                while True:
                    try:
                        self.free.pop()
                        return True
                    except IndexError:
                        self._cond.wait()
            finally:
                self.waiters -= 1

    def release(self):
        if self.free:
            raise RuntimeError("release unlocked lock")
        self.free.append(True)
        if self.waiters:
            self.wake()

    def wake(self):
        """Wake one thread waiting in ``acquire`` (after the token was given back)."""
        with self._cond:
            self._cond.notify()

    def locked(self):
        return not self.free

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
