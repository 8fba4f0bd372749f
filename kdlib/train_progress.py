"""One line per training epoch, printed by the driver; Ray Train's `fit` run so that Ctrl-C reaches the job.

Ray Train V2 calls a `UserCallback` on its controller (an actor) after every round of `ray.train.report`;
`EpochCallback` passes the workers' metrics to the driver through a Ray queue, and `fit` prints each epoch's
line as it arrives: the loss of each task (`loss/<task>`, averaged over the workers) and its dev score
(`dev/<task>`) when the workers report one.

`fit` runs `trainer.fit()` in a helper thread. On the main thread Ray Train would install its own SIGINT
handler, which aborts the run and exits with status 0; here Ctrl-C raises KeyboardInterrupt in the job like
anywhere else (kdlib.console.on_interrupt), and the checkpoints already written stay for the next attempt.
"""

from __future__ import annotations

import math
import os
import threading

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.train import UserCallback
from ray.util.queue import Empty, Queue

# Ray Train's print patch sends a worker's print() to a logger that writes it to stdout and stderr: every
# line twice in the job's log. Read by `fit` from the driver's environment and passed on to the workers.
PRINT_PATCH = "RAY_TRAIN_ENABLE_PRINT_PATCH"
POLL_SECONDS = 0.5


class EpochCallback(UserCallback):
    """On Ray Train's controller: every report round's metrics (one dict per worker) onto the driver's queue."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self._put(("report", metrics))

    def after_exception(self, run_context, worker_exceptions):
        self._put(("failed", {rank: _last_line(e) for rank, e in worker_exceptions.items()}))

    def _put(self, item) -> None:
        """Progress is for people: a queue whose actor died with its node (the driver says so) must not fail
        the controller, and with it the training (CI: tests/test_node_faults.py)."""
        try:
            self.queue.put_nowait(item)
        except ray.exceptions.RayError:
            pass


def epoch_line(name: str, epochs: int, metrics: list[dict]) -> str:
    """'[distill] epoch 2/3 in 0.5s: loss sentiment 0.0711, similarity 0.6344; dev sentiment 81.33, ...'
    (dev scores are the task's primary metric in points, as in the results table)."""
    first = metrics[0]
    parts = []
    for kind, digits in (("loss", 4), ("dev", 2)):
        tasks = dict.fromkeys(k.split("/", 1)[1] for m in metrics for k in m if k.startswith(f"{kind}/"))
        values = {t: _mean([m.get(f"{kind}/{t}") for m in metrics]) for t in tasks}
        if values:
            parts.append(f"{kind} " + ", ".join(f"{t} {v:.{digits}f}" for t, v in values.items()))
    resumed = first.get("start_epoch", 0)
    note = f" (resumed from the checkpoint after epoch {resumed})" if resumed and first["epoch"] == resumed + 1 else ""
    return f"[{name}] epoch {first['epoch']}/{epochs} in {first.get('seconds', 0):.1f}s: {'; '.join(parts)}{note}"


def _last_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _mean(values) -> float:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def fit(make_trainer, *, name: str, epochs: int, log):
    """`make_trainer(callbacks)` builds the trainer with the given Ray Train callbacks; returns its Result.

    Prints one line per epoch (`epoch_line`) and one per worker failure (Ray Train restarts the workers from
    the last checkpoint while `max_failures` allows)."""
    os.environ.setdefault(PRINT_PATCH, "0")
    # On the driver's node: a lost worker node must not take the progress queue with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer = make_trainer([EpochCallback(queue)])
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            outcome["error"] = e

    thread = threading.Thread(target=run, name=f"ray-train-{name}", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or queue.size():
            try:
                kind, payload = queue.get(timeout=POLL_SECONDS)
            except Empty:
                continue
            except ray.exceptions.RayError:  # the queue's actor is gone: train on, without epoch lines
                log(f"[{name}] progress lines lost (their queue's actor died); training goes on")
                thread.join()
                break
            if kind == "report":
                log(epoch_line(name, epochs, payload))
            else:
                log(f"[{name}] training workers failed ({'; '.join(f'rank {r}: {e}' for r, e in payload.items())}); "
                    f"Ray Train restarts them from the last checkpoint while max_failures allows")
    finally:
        try:
            ray.kill(queue.actor)
        except ray.exceptions.RayError:
            pass
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
