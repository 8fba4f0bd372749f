"""What the jobs print (kdlib.console): the console for people, run.log for everything, Ctrl-C as one line.

The end-to-end tests run `python jobs/distill.py` as a real subprocess with its own Ray, as a user does."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from conftest import benchmark_module, tiny_run_overrides
from kdlib import storage
from kdlib.console import RAY_WORKER_PRINTER, RUN_LOG, on_interrupt, run_log
from kdlib.train_progress import epoch_line

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("sentiment", "paraphrase", "similarity")
# What Ray prints on its own: none of it may reach a quiet console.
RAY_NOISE = ("TrainingReport", "Reporting training result", "Checkpoint successfully created", "Execution plan",
             "Progress bars disabled", "execution finished", "Token authentication", "core_worker.cc", "pid=",
             "Started a local Ray instance", "Traceback", "KeyboardInterrupt")
PROGRESS = re.compile(r"^\[labels\] \d+/\d+ examples \([\d.]+%\), [\d.]+ ex/s, elapsed \d+s, ETA (\d+s|\?)$")


@pytest.fixture
def ray_printer():
    """A stand-in for the printer `ray.init` registers for its workers' output (an in-process caller's Ray)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[str] = []
    dispatcher.add_handler(RAY_WORKER_PRINTER, lambda data: printed.extend(data["lines"]))
    yield dispatcher, printed
    dispatcher.remove_handler(RAY_WORKER_PRINTER)


@pytest.fixture
def ray_console():
    """A stand-in for the console handler Ray's logger has (it writes to the stderr of when Ray was imported)."""
    shown = io.StringIO()
    handler = logging.StreamHandler(shown)
    logging.getLogger("ray").addHandler(handler)
    yield shown
    logging.getLogger("ray").removeHandler(handler)


def worker_output(line: str) -> dict:
    return {"pid": 4242, "actor_name": "RayTrainWorker", "ip": "192.0.2.9", "localhost": "192.0.2.1",
            "lines": [line], "is_err": False, "job": ""}


def test_a_quiet_run_prints_kdlib_lines_and_logs_everything(tmp_path, capfd, ray_printer, ray_console):
    dispatcher, printed = ray_printer
    run_dir = tmp_path / "run"
    with run_log(str(run_dir), verbose=False) as log:
        log("[distill] running -> somewhere")
        print("a plain print")
        print("error: a bad input", file=sys.stderr)
        logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster")
        logging.getLogger("ray.data").info("Execution plan of Dataset d: Input -> Map")  # its own handlers
        logging.getLogger("ray.data").debug("a scheduler detail")
        os.write(2, b"[E core_worker.cc:2465] a native warning\n")
        warnings.warn("a library warning")
        dispatcher.emit(worker_output("Reporting training result 1: TrainingReport(...)"))
    out, err = capfd.readouterr()
    assert out.splitlines() == ["[distill] running -> somewhere", "a plain print"]
    assert err.splitlines() == ["error: a bad input"]
    assert printed == [] and ray_console.getvalue() == ""  # Ray's printer and logger were off the console
    text = (run_dir / RUN_LOG).read_text()
    for line in ("[distill] running -> somewhere", "a plain print", "error: a bad input",
                 "INFO ray.data -- Execution plan of Dataset d: Input -> Map",
                 "WARNING ray -- Token authentication is enabled", "[E core_worker.cc:2465] a native warning",
                 "a library warning", "(RayTrainWorker pid=4242, ip=192.0.2.9) Reporting training result 1"):
        assert line in text, line
    assert "a scheduler detail" not in text  # Ray Data's DEBUG records stay in its own session log
    # Everything is as it was: Ray's logger, its printer and file descriptor 2 reach the console again.
    logging.getLogger("ray").warning("after the run")
    os.write(2, b"native after the run\n")
    dispatcher.emit(worker_output("worker after the run"))
    assert capfd.readouterr().err == "native after the run\n"
    assert printed == ["worker after the run"] and ray_console.getvalue() == "after the run\n"
    assert (run_dir / RUN_LOG).read_text() == text


def test_a_verbose_run_leaves_ray_on_the_console_and_still_logs_it(tmp_path, capfd, ray_printer, ray_console):
    dispatcher, printed = ray_printer
    with run_log(str(tmp_path / "run"), verbose=True) as log:
        log("[merge] running -> there")
        logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster")
        dispatcher.emit(worker_output("Checkpoint successfully created"))
        os.write(2, b"a native warning\n")
    out, err = capfd.readouterr()
    assert out.splitlines() == ["[merge] running -> there"] and err == "a native warning\n"
    assert ray_console.getvalue() == "Token authentication is enabled for this Ray cluster\n"
    assert printed == ["Checkpoint successfully created"]  # Ray's printer kept it
    text = (tmp_path / "run" / RUN_LOG).read_text()
    assert "[merge] running -> there" in text and "WARNING ray -- Token authentication is enabled" in text


def test_run_log_in_a_bucket_is_uploaded_and_keeps_earlier_attempts(s3_root):
    run_dir = storage.child(s3_root, "demo")
    for attempt in ("first", "second"):
        with run_log(run_dir) as log:
            log(f"[run] {attempt} attempt")
    text = storage.read_text_at(storage.child(run_dir, RUN_LOG))
    assert text.count("==== ") == 2 and text.index("[run] first attempt") < text.index("[run] second attempt")


def test_ctrl_c_is_one_line_and_status_130(capsys):
    try:
        with pytest.raises(SystemExit) as stopped:
            with on_interrupt("finished stages stay cached"):
                raise KeyboardInterrupt
        assert stopped.value.code == 130
        assert capsys.readouterr().err == ("interrupted: finished stages stay cached; "
                                           "run the same command again to resume\n")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a second Ctrl-C ends the process at once
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_the_epoch_line_averages_the_workers_losses_and_shows_dev_scores():
    workers = [{"epoch": 2, "seconds": 0.53, "start_epoch": 1, "loss/sentiment": 0.2, "loss/similarity": 1.0,
                "dev/sentiment": 81.333, "rows/sentiment": 100},
               {"epoch": 2, "seconds": 0.51, "start_epoch": 1, "loss/sentiment": 0.4, "loss/similarity": 3.0,
                "dev/sentiment": 81.333, "rows/sentiment": 100}]
    assert epoch_line("distill", 3, workers) == ("[distill] epoch 2/3 in 0.5s: loss sentiment 0.3000, similarity "
                                                 "2.0000; dev sentiment 81.33 (resumed from the checkpoint after "
                                                 "epoch 1)")
    third = [{**w, "epoch": 3} for w in workers]
    no_dev = [{k: v for k, v in w.items() if not k.startswith("dev/")} for w in third]
    assert epoch_line("fine_tune", 3, no_dev) == "[fine_tune] epoch 3/3 in 0.5s: loss sentiment 0.3000, similarity 2.0000"


def test_benchmark_scratch_folders_are_created_when_missing(tmp_path):
    common = benchmark_module("common")
    fresh = common.scratch_dir(tmp_path / "not" / "yet", "kdlib-x-")
    assert fresh.is_dir() and fresh.parent == tmp_path / "not" / "yet" and not any(fresh.iterdir())


# -- end to end: `python jobs/distill.py` as a subprocess -------------------------------------------------------

def job_command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "jobs/distill.py", *tiny_run_overrides(root), *extra]


def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_job(root: Path, *extra: str, interrupt_at: str | None = None, timeout: float = 900):
    """Run the job; with `interrupt_at` (a regex), send SIGINT to its process group, as Ctrl-C in a terminal
    does, once a printed line matches. Returns (exit status, stdout lines, stderr text)."""
    proc = subprocess.Popen(job_command(root, *extra), cwd=ROOT, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if interrupt_at and not sent and re.search(interrupt_at, line):
                os.killpg(proc.pid, signal.SIGINT)
                sent = True
        code = proc.wait()
    finally:
        watchdog.cancel()
    reader.join(timeout=60)
    assert not interrupt_at or sent, f"no line matched {interrupt_at!r}:\n" + "\n".join(lines)
    return code, lines, "".join(err)


def content_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.strip() and not set(line) <= set("|- ")]


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    started = time.perf_counter()
    code, lines, err = run_job(root)
    return root, code, lines, err, time.perf_counter() - started


@pytest.mark.slow
def test_the_console_of_a_run_is_short_and_run_log_holds_everything(fresh_run):
    root, code, lines, err, _ = fresh_run
    console = "\n".join(lines)
    assert code == 0, console + err
    assert err == "", err
    assert not [n for n in RAY_NOISE if n in console], console
    # Measured: 43 lines besides the labeling progress (one every labeling.progress_seconds); Ray's own
    # logging printed ~235 before.
    progress = [line for line in lines if PROGRESS.match(line)]
    assert progress and len(lines) - len(progress) <= 45, console
    content = content_lines(lines)
    assert len(content) == len(set(content)), [line for line in content if content.count(line) > 1]

    def has(pattern: str) -> bool:
        return any(re.match(pattern, line) for line in lines)

    for task in TASKS:  # every stage says where its output goes, then how long it took and where it ran
        assert has(rf"\[teachers:{task}\] running -> {re.escape(str(root))}/cache/teachers/\w+$"), task
        assert has(rf"\[teachers:{task}\] done in [\d.]+s on \S+$"), task
        assert has(rf"\[labels:{task}\] done in [\d.]+s on \S+ \(\d+ shards?\): \d+ examples in the store"), task
    assert has(r"\[labels\] 11 shards planned, 0 already in the store, labeling 11 \(1900 examples\)$")
    assert has(r"\[distill\] running -> .*/cache/distill/\w+$")
    assert has(r"\[distill\] done in [\d.]+s on \S+ \(2 train workers\)$")
    assert has(r"\[merge\] done in [\d.]+s on driver")
    score = r"-?[\d.]+"
    epochs = [re.fullmatch(rf"\[distill\] epoch (\d)/2 in [\d.]+s: loss sentiment {score}, paraphrase {score}, "
                           rf"similarity {score}; dev sentiment {score}, paraphrase {score}, similarity {score}", line)
              for line in lines if line.startswith("[distill] epoch")]
    assert all(epochs) and [m.group(1) for m in epochs] == ["1", "2"], lines
    table = next(i for i, line in enumerate(lines) if line.startswith("| task | metric |"))
    assert [line.split(" | ")[0] for line in lines[table + 2:table + 5]] == [f"| {t}" for t in TASKS]
    assert "| stage | output | where | seconds |" in lines
    assert lines[-1].startswith(f"results: {root}/demo/results.json")
    # run.log: the console's lines, and what the console left out.
    log = (root / "demo" / RUN_LOG).read_text()
    assert all(line in log for line in content)
    for hidden in ("Reporting training result", "(TrainController pid=", "Execution plan of Dataset",
                   "Started a local Ray instance"):
        assert hidden in log, hidden


@pytest.mark.slow
def test_ctrl_c_keeps_what_is_done_and_the_same_command_resumes(tmp_path):
    kept = "interrupted: finished stages stay cached, committed label shards and Ray Train checkpoints are kept; " \
           "run the same command again to resume"
    epochs = "distill.epochs=10"

    def assert_stopped(code, lines, err):
        everything = "\n".join(lines) + err
        assert code == 130, everything
        assert err.strip().splitlines() == [kept], err
        assert "Traceback" not in everything and "KeyboardInterrupt" not in everything, everything

    # During labeling, once the teachers are done (Ray Data's actors at work).
    code, lines, err = run_job(tmp_path, epochs, interrupt_at=r"^\[labels\] \d+ shards planned")
    assert_stopped(code, lines, err)
    assert sum(line.startswith("[teachers:") and " done in " in line for line in lines) == 3
    # Again, once training has written its first checkpoint (Ray Train's workers at work).
    code, lines, err = run_job(tmp_path, epochs, interrupt_at=r"^\[distill\] epoch 1/10 ")
    assert_stopped(code, lines, err)
    assert all(f"[teachers:{t}] inputs unchanged, reusing" in "\n".join(lines) for t in TASKS)
    assert not any(line.startswith("[distill] epoch 10/10") for line in lines)  # stopped before the end
    # The same command again: nothing done is redone, training resumes from its last checkpoint.
    code, lines, err = run_job(tmp_path, epochs)
    console = "\n".join(lines)
    assert code == 0 and err == "", console + err
    for task in TASKS:
        assert f"[teachers:{task}] inputs unchanged, reusing" in console
        assert f"[labels:{task}] inputs unchanged, reusing" in console
    trained = [int(re.match(r"\[distill\] epoch (\d+)/10", line).group(1)) for line in lines
               if line.startswith("[distill] epoch")]
    assert trained[0] > 1 and trained == list(range(trained[0], 11)), trained
    first = next(line for line in lines if line.startswith(f"[distill] epoch {trained[0]}/10"))
    assert first.endswith(f"(resumed from the checkpoint after epoch {trained[0] - 1})")
    log = (tmp_path / "demo" / RUN_LOG).read_text()
    assert log.count("\n==== ") + log.startswith("==== ") == 3 and log.count(kept) == 2
