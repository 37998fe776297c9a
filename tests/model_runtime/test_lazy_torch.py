"""A process serving only ONNX Runtime models never imports torch (``tessera edge`` on a small gateway).

Each check runs in a fresh interpreter: this test process has imported torch long before.
"""

from __future__ import annotations

import json
import subprocess

from tests.support import REPO_ROOT, python_argv

SERVE_ONNX = """
import json, sys

import numpy as np
from onnx import TensorProto, helper

import model_runtime
from model_runtime import ModelRuntime, ModelSpec, OnnxRuntimeBackend

imported = "torch" in sys.modules
graph = helper.make_graph(
    [helper.make_node("Mul", ["x", "two"], ["doubled"])], "double",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
    [helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", 3])],
    [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
runtime = ModelRuntime()
runtime.load_sync(ModelSpec(name="double", version="v1", device="cpu", uses_torch=False,
                            loader=lambda _ctx: OnnxRuntimeBackend(model.SerializeToString(), threads=1),
                            run_batch=lambda backend, items: list(backend(np.stack(items))),
                            warmup_items=[np.zeros(3, np.float32)]))
answers = runtime.predict_many_sync("double", [np.full(3, value, np.float32) for value in range(4)])
loaded = runtime.loaded()["double"]
runtime.close_sync()
print(json.dumps({"on_import": imported, "answers": [answer.tolist() for answer in answers], "loaded": loaded,
                  "torch": sorted(name for name in sys.modules if name.split(".")[0] == "torch")}))
"""


def test_an_onnx_model_is_loaded_and_served_without_importing_torch() -> None:
    done = subprocess.run(python_argv("-c", SERVE_ONNX), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["on_import"] is False and answer["torch"] == []
    assert answer["answers"] == [[2.0 * value] * 3 for value in range(4)]
    assert (answer["loaded"]["device"], answer["loaded"]["backend"]) == ("cpu", "onnx")
