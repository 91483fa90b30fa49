"""A small ONNX graph builder whose initializers stream into one external data file as they are added.

Nothing but the graph's structure (and tensors under INLINE_BYTES) stays in memory: each weight is written to
``model.onnx.data`` at a page-aligned offset (onnxruntime memory-maps aligned external data) and forgotten.
"""
from __future__ import annotations

from pathlib import Path
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_quant import quantize_int4

MS_DOMAIN = "com.microsoft"
OPSET = 21
IR_VERSION = 10  # what onnxruntime >= 1.20 (and onnxruntime-genai's bundled runtime) reads
ALIGN = 4096
INLINE_BYTES = 1024

# weight storage per export bit width: how a linear layer's weight is stored and computed
WEIGHT_MODES = {4: "int4", 16: "f16", 32: "f32"}


class GraphBuilder:
    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self._data = open(self.data_path, "wb")
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self.bytes_written = 0

    # ---- tensors -------------------------------------------------------------------------------------------
    def constant(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; large ones go to the external data file now."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        return self.stacked_constant(name, [array], array.shape)

    def stacked_constant(self, name: str, parts, shape: tuple[int, ...]) -> str:
        """An external initializer of `shape` written part by part (e.g. one expert at a time): each part is an
        array of one dtype, written as it comes, so only one part is ever in memory."""
        pad = (-self._offset) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        start, dtype = self._offset, None
        for part in parts:
            part = np.ascontiguousarray(part)
            if dtype is not None and part.dtype != dtype:
                raise ValueError(f"initializer {name}: parts of dtypes {dtype} and {part.dtype}")
            dtype = part.dtype
            self._data.write(part.tobytes())
            self._offset += part.nbytes
        length = self._offset - start
        if dtype is None or length != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"initializer {name}: parts hold {length} bytes, shape {list(shape)} needs more or less")
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(dtype)
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(start)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.bytes_written += length
        self.initializers.append(t)
        return name

    def scalar(self, name: str, value, dtype=np.int64) -> str:
        if name not in self._names:
            self._names.add(name)
            self.constant(name, np.array(value, dtype=dtype))
        return name

    # ---- nodes ---------------------------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
             unused: tuple[int, ...] = (), **attrs) -> list[str]:
        """Add a node; its outputs are named "{name}/output_{i}" ("" for the indices in `unused`)."""
        outs = ["" if i in unused else f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, source: str, name: str, elem_type: int, shape: list) -> None:
        self.nodes.append(helper.make_node("Identity", [source], [name], name=f"/output/{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    # ---- layers --------------------------------------------------------------------------------------------
    def linear(self, name: str, x: str, weight: np.ndarray, bias: np.ndarray | None, mode: str,
               block: int = 32, symmetric: bool = True, accuracy_level: int = 4) -> str:
        """y = x @ weight.T (+ bias); weight is (N, K) float32, stored as `mode` (int4 | f16 | f32)."""
        n, k = weight.shape
        if mode == "int4":
            q = quantize_int4(weight, block, symmetric)
            ins = [self.constant(f"{name}.weight_Q4", q.packed), self.constant(f"{name}.weight_scales", q.scales.reshape(-1))]
            if q.zero_points is not None:
                ins.append(self.constant(f"{name}.weight_zp", q.zero_points.reshape(-1)))
            y = self.op("MatMulNBits", [x] + ins, f"{name}/MatMulNBits", MS_DOMAIN, K=k, N=n, bits=4,
                        block_size=block, accuracy_level=accuracy_level)
        elif mode == "f16":
            w = self.constant(f"{name}.weight", weight.T.astype(np.float16))  # (K, N)
            w32 = self.op("Cast", [w], f"{name}/weight/Cast", to=TensorProto.FLOAT)
            y = self.op("MatMul", [x, w32], f"{name}/MatMul")
        elif mode == "f32":
            w = self.constant(f"{name}.weight", np.ascontiguousarray(weight.T, dtype=np.float32))  # (K, N)
            y = self.op("MatMul", [x, w], f"{name}/MatMul")
        else:
            raise ValueError(f"linear {name}: weight mode {mode!r}; allowed: {', '.join(WEIGHT_MODES.values())}")
        if bias is not None:
            y = self.op("Add", [y, self.constant(f"{name}.bias", bias.astype(np.float32))], f"{name}/BiasAdd")
        return y

    def float_table(self, name: str, table: np.ndarray, mode: str) -> tuple[str, bool]:
        """A float table stored at the mode's precision: (initializer name, needs a Cast to float32)."""
        if mode == "f32":
            return self.constant(name, table.astype(np.float32)), False
        return self.constant(name, table.astype(np.float16)), True

    # ---- output --------------------------------------------------------------------------------------------
    def save(self, model_path: Path, graph_name: str, metadata: dict[str, str]) -> None:
        self._data.close()
        write_model(model_path, self, graph_name, metadata)

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()


def write_model(model_path: Path, g, graph_name: str, metadata: dict[str, str]) -> None:
    """Serialize g's nodes, inputs, outputs and initializers as an ONNX model, written to a temporary name first."""
    graph = helper.make_graph(g.nodes, graph_name, g.inputs, g.outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="edgephi", ir_version=IR_VERSION)
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    tmp = Path(str(model_path) + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(model_path)
