"""Steps that an interrupt cannot cut in half.

A step is one unit: the kernels update the params and state, then the host advances the step counts (and the guard,
the skipped-step count, the adapter's ``step`` tensors). A KeyboardInterrupt raised between the two would leave every
later step at the wrong schedule position, so SIGINT is held while a step runs and raised as soon as it is done.
The kernels themselves are never interrupted (the handler runs between bytecodes), so holding it delays Ctrl-C by
at most one step.
"""
import contextlib
import signal
import threading


def _record(received):
    def handler(number, frame):
        received.append(frame)
    handler.fastopt_deferring = True  # a nested step sees that the interrupt is already held
    return handler


@contextlib.contextmanager
def deferred():
    """Hold SIGINT until the block ends, then deliver it to the handler that was installed (Python's default raises
    KeyboardInterrupt). Only the main thread receives signals: elsewhere, and where SIGINT is ignored, left to the
    system or already held, this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous) or getattr(previous, "fastopt_deferring", False):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, _record(received))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            previous(signal.SIGINT, received[-1])
