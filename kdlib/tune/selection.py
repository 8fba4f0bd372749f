"""Choosing each task's (L, l) from a search table: the paper's threshold rule and an exact layer budget.

A candidate is one branch a task could put into the merged model: a student of l layers distilled from
the teacher that fine-tuned the top L layers (it attaches at depth N - L), or (l = L) that teacher's best
member itself, undistilled ("w/o KD" in the paper). The merged model runs the trunk once up to the deepest
branch point and every branch on top: total layers = max_t (N - L_t) + sum_t l_t.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Candidate:
    task: str
    L: int  # teacher's fine-tuned layers; the branch attaches at depth N - L
    l: int  # branch layers
    score: float  # primary dev score (points)
    teacher_score: float  # the (task, L) teacher ensemble's dev score, which picks L (sec. 3.1)
    source: str = "student"  # "student" (distilled) or "teacher" (best member, no KD)
    path: str | None = None  # single-task artifact of the branch

    def depth(self, encoder_layers: int) -> int:
        return encoder_layers - self.L

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Selection:
    rule: str  # "threshold" or "budget"
    setting: float  # c or B
    choice: dict[str, Candidate]
    reasons: dict[str, str]

    def total_layers(self, encoder_layers: int) -> int:
        return total_layers(list(self.choice.values()), encoder_layers)

    def overhead(self, encoder_layers: int) -> float:
        return self.total_layers(encoder_layers) / (encoder_layers * len(self.choice))

    def average(self) -> float:
        return sum(c.score for c in self.choice.values()) / len(self.choice)


def total_layers(choice: list[Candidate], encoder_layers: int) -> int:
    """Transformer layers the merged model runs: the shared trunk once, then every branch."""
    return max(c.depth(encoder_layers) for c in choice) + sum(c.l for c in choice)


def by_task(cands: list[Candidate]) -> dict[str, list[Candidate]]:
    out: dict[str, list[Candidate]] = {}
    for c in cands:
        out.setdefault(c.task, []).append(c)
    return out


def threshold_select(cands: list[Candidate], c: float) -> Selection:
    """Paper sec. 4.2 and Table 5: per task, L by the best teacher, then grow l while it pays c per layer.

    L is the fine-tuning depth whose teacher scores best on dev (ties: the smaller L, more sharing). Among
    that teacher's branches (students of l = 1, 2, ... and the undistilled teacher, l = L), start from the
    smallest and move to the next larger one whose gain per added layer, (s' - s) / (l' - l), is at least c;
    stop when no larger branch qualifies. Comparing per added layer is what reproduces Table 5 where the
    ladder jumps from l = 3 to the teacher's L (CoLA takes (4, 8) at c = 1: 5.2 points over 5 layers).
    """
    choice, reasons = {}, {}
    for task, opts in by_task(cands).items():
        teachers = {o.L: o.teacher_score for o in opts}
        best_L = min(teachers, key=lambda L: (-teachers[L], L))
        ladder = sorted((o for o in opts if o.L == best_L), key=lambda o: (o.l, o.source != "student"))
        steps = [f"L={best_L}: best teacher ({teachers[best_L]:.2f}) among L tried "
                 f"{ {L: round(s, 2) for L, s in sorted(teachers.items())} }"]
        cur = ladder[0]
        while True:
            nxt = next((o for o in ladder if o.l > cur.l and (o.score - cur.score) / (o.l - cur.l) >= c), None)
            if nxt is None:
                break
            steps.append(f"l {cur.l}->{nxt.l}: +{(nxt.score - cur.score) / (nxt.l - cur.l):.2f} points/layer >= c={c:g}")
            cur = nxt
        larger = [o for o in ladder if o.l > cur.l]
        if larger:
            best_gain = max((o.score - cur.score) / (o.l - cur.l) for o in larger)
            steps.append(f"stop at l={cur.l}: best gain of a larger branch {best_gain:.2f} points/layer < c={c:g}")
        else:
            steps.append(f"stop at l={cur.l}: no larger branch tried")
        choice[task], reasons[task] = cur, "; ".join(steps)
    return Selection("threshold", c, choice, reasons)


def budget_select(cands: list[Candidate], budget: int, encoder_layers: int) -> Selection | None:
    """Exact: per task one candidate maximising the average score with total layers <= budget.

    The trunk costs max_t depth_t, so for every possible trunk depth D the tasks are limited to branches
    attaching at depth <= D and a multiple-choice knapsack (capacity B - D, weights l) picks the best sum
    of scores; the best D wins. Ties go to fewer total layers. None when no choice fits the budget.
    """
    tasks = by_task(cands)
    best: tuple[float, int, dict[str, Candidate]] | None = None
    for D in sorted({o.depth(encoder_layers) for o in cands}):
        cap = budget - D
        if cap < len(tasks):
            continue
        # dp[w] = (best score sum, choice) using exactly w branch layers over the tasks so far
        dp: dict[int, tuple[float, dict[str, Candidate]]] = {0: (0.0, {})}
        for task, opts in tasks.items():
            fits = [o for o in opts if o.depth(encoder_layers) <= D]
            nxt: dict[int, tuple[float, dict[str, Candidate]]] = {}
            for w, (s, ch) in dp.items():
                for o in fits:
                    w2 = w + o.l
                    if w2 <= cap and (w2 not in nxt or s + o.score > nxt[w2][0] + 1e-12):
                        nxt[w2] = (s + o.score, {**ch, task: o})
            dp = nxt
        for w, (s, ch) in dp.items():
            layers = total_layers(list(ch.values()), encoder_layers)
            if best is None or s > best[0] + 1e-9 or (abs(s - best[0]) <= 1e-9 and layers < best[1]):
                best = (s, layers, ch)
    if best is None:
        return None
    s, layers, choice = best
    reasons = {t: f"budget B={budget}: (L={o.L}, l={o.l}) in the best-average choice "
                  f"({s / len(choice):.2f} avg, {layers} layers; trunk "
                  f"{max(x.depth(encoder_layers) for x in choice.values())})" for t, o in choice.items()}
    return Selection("budget", budget, choice, reasons)


def brute_force_select(cands: list[Candidate], budget: int, encoder_layers: int) -> tuple[float, int] | None:
    """(best average, its fewest total layers) over every combination: the reference for tests."""
    import itertools

    tasks = by_task(cands)
    best = None
    for combo in itertools.product(*tasks.values()):
        layers = total_layers(list(combo), encoder_layers)
        if layers > budget:
            continue
        avg = sum(o.score for o in combo) / len(combo)
        if best is None or avg > best[0] + 1e-9 or (abs(avg - best[0]) <= 1e-9 and layers < best[1]):
            best = (avg, layers)
    return best


def curve(cands: list[Candidate], encoder_layers: int, thresholds: list[float], budgets: list[int]) -> list[dict]:
    """Quality against overhead for every c and B: one point per selection (duplicates kept, labelled)."""
    n_tasks = len(by_task(cands))
    if not budgets:
        lo = min(o.depth(encoder_layers) for o in cands) + n_tasks
        budgets = list(range(lo, encoder_layers * n_tasks + 1))
    points = []
    for sel in [threshold_select(cands, c) for c in thresholds] + [budget_select(cands, b, encoder_layers)
                                                                    for b in budgets]:
        if sel is not None:
            points.append({"rule": sel.rule, "setting": sel.setting, "average": sel.average(),
                           "total_layers": sel.total_layers(encoder_layers),
                           "overhead": sel.overhead(encoder_layers),
                           "choice": {t: [o.L, o.l, o.source] for t, o in sel.choice.items()}})
    return points
