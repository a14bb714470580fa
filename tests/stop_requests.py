"""Stops at chosen steps for the tests of resuming: a stand-in for `loop.StopRequests` whose stop
requests come from `should_stop(step)` rather than from signals."""


def stop_when(should_stop):
    """A StopRequests class that stops where `should_stop(step)` says (patch it over loop.StopRequests)."""

    class Requests:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def should_stop(self, step):
            return should_stop(step)

    return Requests
