"""The ONNX graphs behind the demo models, each produced as deterministic bytes."""

from typing import Any

import onnx
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from tensorway.demo_models._datasets import Split

# Pinned rather than "latest the converter knows", so a library upgrade cannot silently
# change the graphs; onnxruntime >= 1.14 runs these opsets.
_OPSET = 17
_ML_OPSET = 3
_IR_VERSION = 8
_PRODUCER = "tensorway.demo_models"
_TRAIN_SEED = 0


def arithmetic_onnx() -> bytes:
    """Triton's quick-start graph: INT32 [N,16] INPUT0, INPUT1 -> OUTPUT0 = sum, OUTPUT1 = difference."""

    def int32_batch(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.INT32, ["N", 16])

    graph = helper.make_graph(
        nodes=[
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="sum"),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="difference"),
        ],
        name="simple",
        inputs=[int32_batch("INPUT0"), int32_batch("INPUT1")],
        outputs=[int32_batch("OUTPUT0"), int32_batch("OUTPUT1")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET)],
        ir_version=_IR_VERSION,
        producer_name=_PRODUCER,
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def train_digits(split: Split) -> Any:
    """A small MLP on the digits pixels; converges in well under its iteration limit."""
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(32,), max_iter=500, random_state=_TRAIN_SEED),
    )
    # BLAS reductions may be ordered differently with more threads, which would change
    # the weights in their last bits; one thread keeps the exported bytes reproducible.
    with threadpool_limits(limits=1):
        return model.fit(split.x_train, split.y_train)


def train_iris(split: Split) -> Any:
    """Multinomial logistic regression on the four iris measurements."""
    with threadpool_limits(limits=1):
        return LogisticRegression(max_iter=1000, random_state=_TRAIN_SEED).fit(split.x_train, split.y_train)


def classifier_onnx(estimator: Any, n_features: int) -> bytes:
    """Export a fitted classifier.

    FP32 ``input`` [N,F] -> INT64 ``label`` [N] and FP32 ``probabilities`` [N,C].
    """
    model = to_onnx(
        estimator,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        # Without this the probabilities come out as a sequence of maps, which Triton cannot carry.
        options={"zipmap": False},
        target_opset={"": _OPSET, "ai.onnx.ml": _ML_OPSET},
    )
    data: bytes = model.SerializeToString()
    return data
