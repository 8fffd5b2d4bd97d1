"""Shadow answers compared and mismatches sampled: the bound per model version and interval, on a
fake clock, and what a sample shows."""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from tensorway.common.v1 import tensor_pb2
from tensorway.inference.v1 import inference_service_pb2 as pb
from tensorway.router.shadow import MismatchSamples, differences, same_outputs


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_samples_are_bounded_per_model_version_and_interval() -> None:
    clock = Clock()
    samples = MismatchSamples(2, timedelta(minutes=1), clock=clock)
    assert [samples.take("simple", "2") for _ in range(5)] == [True, True, False, False, False]
    assert samples.take("simple", "3")  # another version has its own bound
    assert samples.take("iris", "2")
    clock.now += 59
    assert not samples.take("simple", "2")
    clock.now += 1
    assert [samples.take("simple", "2") for _ in range(3)] == [True, True, False]


def answer(**outputs: np.ndarray) -> pb.InferResponse:
    return pb.InferResponse(
        outputs=[
            tensor_pb2.Tensor(
                name=name, datatype="INT32", shape=list(values.shape), raw_contents=values.tobytes()
            )
            for name, values in outputs.items()
        ]
    )


def test_a_sample_names_each_differing_output_with_both_sides() -> None:
    same = np.arange(16, dtype=np.int32).reshape(1, 16)
    primary = answer(OUTPUT0=same, OUTPUT1=same)
    shadow = answer(OUTPUT0=same, OUTPUT1=same + 1)
    assert not same_outputs(primary, shadow)
    assert differences(primary, shadow) == {
        "OUTPUT1": {
            "primary": "INT32[1, 16] [0, 1, 2, 3, 4, 5, 6, 7]",
            "shadow": "INT32[1, 16] [1, 2, 3, 4, 5, 6, 7, 8]",
        }
    }
    assert differences(primary, answer(OUTPUT0=same)) == {
        "OUTPUT1": {"primary": "INT32[1, 16] [0, 1, 2, 3, 4, 5, 6, 7]", "shadow": "missing"}
    }
    assert differences(primary, primary) == {}
