"""The distillation pipeline's stages, one module each, in the order a run calls them.

    data -> teachers -> labels -> distill -> fine_tune -> merge -> evaluate

Every stage is a function with typed inputs and outputs (dataclasses) that owns its cache key, its Ray
work and its artifacts; `RunContext` carries what all of them share (the validated config, the resolved
encoder, the stage cache). jobs/distill.py is the recipe that calls them; the depth search, the
benchmarks and the tests call the same functions.
"""

from kdlib.pipeline.context import RunContext
from kdlib.pipeline.data import TaskData, load_data
from kdlib.pipeline.distill import Students, distill_students
from kdlib.pipeline.evaluate import Results, evaluate, student_dirs, write_results
from kdlib.pipeline.fine_tune import fine_tune
from kdlib.pipeline.labels import Labels, label_tasks, plan_labels
from kdlib.pipeline.merge import merge_students
from kdlib.pipeline.teachers import Teachers, teacher_key, train_teachers

__all__ = ["RunContext", "TaskData", "load_data", "Teachers", "teacher_key", "train_teachers", "Labels",
           "plan_labels", "label_tasks", "Students", "distill_students", "fine_tune", "merge_students",
           "Results", "evaluate", "write_results", "student_dirs"]
