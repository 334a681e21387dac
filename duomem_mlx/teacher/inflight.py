"""Jobs on N threads, results in job order: how `teach --concurrency N` keeps N episodes in flight
(each worker with its own environment) and still writes the cache in task-spec order, so the
cache's bytes do not depend on N or on which episode finished first."""

import threading
from typing import Any, Callable, Iterator


def in_order(
    jobs: list, n: int, start: Callable[[int], Any], run: Callable[[Any, Any], Any], close: Callable[[Any], None]
) -> Iterator:
    """Yield run(state, job) for each job, in the jobs' order, as soon as every earlier one is out.
    Worker i makes its state with start(i) in its own thread on its first job (an environment
    started lazily) and closes it when the jobs run out or the caller stops reading. An exception
    of a job (or of start) is raised here at that job's turn; the workers then take no new job.
    A worker takes a new job only while fewer than n finished results wait for their turn (one slow
    job cannot make the others pile up results in memory, lost by a kill). When the caller stops
    reading (or a job fails) the workers finish the job in hand, close their state, and are joined
    before this returns. With n = 1 the jobs run in this thread (an mlx: teacher's model stays on
    the thread that loaded it)."""
    if n == 1:
        yield from in_turn(jobs, start, run, close)
        return
    results: dict[int, tuple[bool, Any]] = {}
    ready, stop = threading.Condition(), threading.Event()
    queue = iter(enumerate(jobs))

    def worker(i: int) -> None:
        state = None
        try:
            while True:
                with ready:
                    ready.wait_for(lambda: stop.is_set() or len(results) < n)
                    index, job = (None, None) if stop.is_set() else next(queue, (None, None))
                if index is None:
                    return
                try:
                    state = start(i) if state is None else state
                    outcome = (True, run(state, job))
                except BaseException as e:  # handed to the reader, raised at this job's turn
                    outcome = (False, e)
                with ready:
                    results[index] = outcome
                    ready.notify_all()
        finally:
            if state is not None:
                close(state)

    threads = [
        threading.Thread(target=worker, args=(i,), daemon=True, name=f"teach-{i}") for i in range(min(n, len(jobs)))
    ]
    for thread in threads:
        thread.start()
    try:
        for index in range(len(jobs)):
            with ready:
                ready.wait_for(lambda: index in results)
                ok, value = results.pop(index)
                ready.notify_all()  # room for a worker waiting to take a job
            if not ok:
                raise value
            yield value
    finally:
        with ready:
            stop.set()
            ready.notify_all()
        for thread in threads:
            thread.join()


def in_turn(
    jobs: list, start: Callable[[int], Any], run: Callable[[Any, Any], Any], close: Callable[[Any], None]
) -> Iterator:
    state = None
    try:
        for job in jobs:
            state = start(0) if state is None else state
            yield run(state, job)
    finally:
        if state is not None:
            close(state)
