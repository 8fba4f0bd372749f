"""Write each task's training rows beyond `max_train_examples` as an unlabeled text file: a transfer set.

When the teachers train on a capped set (the quick benchmarks' 1,500 rows per task), the rest of the
training text is still in-domain input a student can learn the teachers' outputs on. The files hold text
only (gold labels are dropped), in the format `tasks.<task>.unlabeled` reads, so jobs/distill.py labels
them with the teachers like any unlabeled text (MKD sec. 6.2 and TinyBERT distil on such teacher-labeled
data):

    python jobs/transfer_set.py configs/glue_mini.yaml data_dir=$PWD/../shared/data/glue-mini \
        tasks.sst2.max_train_examples=1500 tasks.mrpc.max_train_examples=1500 \
        tasks.stsb.max_train_examples=1500 --out runs/transfer
    # then pass the printed tasks.<task>.unlabeled=... overrides to jobs/distill.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdlib.augment import write_unlabeled
from kdlib.config import load_run_config
from kdlib.config_loading import config_and_overrides
from kdlib.console import on_interrupt
from kdlib.errors import KdlibError
from kdlib.readers import read_split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", help="CONFIG.yaml [key.path=value ...]")
    p.add_argument("--out", required=True, help="folder for <task>.txt (outside the repository)")
    a = p.parse_args(argv)
    config_path, overrides = config_and_overrides(a.args, "configs/glue_mini.yaml")
    with on_interrupt("the task files already listed are complete (each is written whole)",
                      then="run the same command again to write them all"):
        return write_transfer_sets(config_path, overrides, Path(a.out).resolve())


def write_transfer_sets(config_path: str, overrides: list[str], out: Path) -> int:
    try:
        cfg = load_run_config(config_path, overrides)
        flags = []
        for name, t in cfg.tasks.items():
            if t.max_train_examples is None:
                print(f"[transfer:{name}] max_train_examples is not set: every training row is used already")
                continue
            train, _ = read_split(task=name, split="train", path=cfg.task_path(name, "train"), format=t.format,
                                  text_column=t.text_column, text_pair_column=t.text_pair_column,
                                  label_column=t.label_column, kind=t.kind, labels=t.labels, hub_config=t.hub_config,
                                  header=t.header)
            rest = train.iloc[t.max_train_examples:]
            if rest.empty:
                print(f"[transfer:{name}] {len(train)} training rows, none past the first {t.max_train_examples}")
                continue
            pairs = rest["text_pair"].tolist() if t.text_pair_column is not None else None
            written = write_unlabeled(rest["text"].tolist(), pairs, str(out / f"{name}.txt"))
            print(f"[transfer:{name}] {written} of {len(train)} training rows (after the first "
                  f"{t.max_train_examples}) -> {out / f'{name}.txt'}")
            if written:
                flags.append(f"tasks.{name}.unlabeled={out / f'{name}.txt'}")
    except KdlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(flags))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
