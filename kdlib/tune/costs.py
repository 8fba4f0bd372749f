"""Layer passes a sweep spends, with and without the caches: the theoretical speed-up of caching.

Unit: one transformer layer applied to one example; a training step counts 3 (forward + backward).
Without caches every trial computes its own trunk states (depth N - L, train + dev), trains its own K
teachers (train_ensemble: trunk once, then K x epochs training steps of L layers) and labels with them;
its student trains `epochs` epochs of l layers and scores dev at each of `scored_epochs` it reached;
with caches, trunk states are paid once per (task, depth), teachers and their logits once per (task, L),
and a repeated (L, l) student replays its stored scores.
"""

from __future__ import annotations

import pandas as pd


def layer_passes(table: pd.DataFrame, *, encoder_layers: int, rows: dict[str, tuple[int, int]], members: int,
                 teacher_epochs: int, scored_epochs: list[int], cached: bool) -> int:
    """Layer passes of the sweep in `table` (trials that ran); rows = {task: (train rows, dev rows)};
    scored_epochs: the epochs after which a trial scores dev (kdlib.tune.search.scored_epochs)."""
    ran = table[table["status"] == "ok"]
    total, seen_depth, seen_L, seen_student = 0, set(), set(), set()
    for _, r in ran.iterrows():
        L, l, task = int(r["L"]), int(r["l"]), r["task"]
        n_tr, n_dev = rows[task]
        d = encoder_layers - L
        states = d * (n_tr + n_dev)
        teacher = d * n_tr + members * teacher_epochs * L * 3 * n_tr + members * L * (n_tr + n_dev)
        epochs = int(r["epochs"])
        student = epochs * l * 3 * n_tr + sum(e <= epochs for e in scored_epochs) * l * n_dev
        if not cached:
            total += states + teacher + student
            continue
        total += 0 if (task, d) in seen_depth else states
        total += 0 if (task, L) in seen_L else teacher
        total += 0 if (task, L, l) in seen_student else student
        seen_depth.add((task, d))
        seen_L.add((task, L))
        seen_student.add((task, L, l))
    return total
