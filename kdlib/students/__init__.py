"""Multi-task student architectures for distillation (MKD sec. 3.2, 3.3, 4; CMOW paper sec. III).

Every student shares one encoder across tasks and has one head per task:
`forward(inputs, task) -> (B, C)` and `forward_tasks(inputs, tasks) -> {task: (B, C)}` (one encoding).
"""

from kdlib.students.base import MultiTaskStudent
from kdlib.students.bilstm import BiAttentiveLSTMEncoder, BiAttentiveLSTMStudent
from kdlib.students.binning import ScoreBins
from kdlib.students.cmow import CMOWEncoder, CMOWStudent
from kdlib.students.heads import MLPHead, TaskHead
from kdlib.students.inputs import StudentInputs, make_student_inputs
from kdlib.students.pairs import PAIR_FEATURES, combine_pair
from kdlib.students.prefix_product import (
    matrix_product,
    prefix_products,
    sequential_matrix_product,
    sequential_prefix_products,
)
from kdlib.students.registry import STUDENT_NAMES, build_student_model, count_parameters
from kdlib.students.small_transformer import SmallTransformerStudent

__all__ = [
    "PAIR_FEATURES",
    "STUDENT_NAMES",
    "BiAttentiveLSTMEncoder",
    "BiAttentiveLSTMStudent",
    "CMOWEncoder",
    "CMOWStudent",
    "MLPHead",
    "MultiTaskStudent",
    "ScoreBins",
    "SmallTransformerStudent",
    "StudentInputs",
    "TaskHead",
    "build_student_model",
    "combine_pair",
    "count_parameters",
    "make_student_inputs",
    "matrix_product",
    "prefix_products",
    "sequential_matrix_product",
    "sequential_prefix_products",
]
