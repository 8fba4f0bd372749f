"""Ray Tune search over per-task fine-tuning depth L and distilled branch layers l (flexible-multitask-bert-serving).

config.py (schema) -> caches.py (trunk states, teachers, students) -> trial.py (one (task, L, l) trial)
-> search.py (one Tuner per task, resumable) -> selection.py (threshold c, layer budget B) -> report.py.
"""
