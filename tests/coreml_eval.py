"""A small numpy evaluator for saved Core ML ML programs, so Linux tests can run what Core ML would run.

Core ML predicts only on macOS; coremltools can still read a saved .mlpackage back into a MIL program
(coremltools/converters/mil/frontend/milproto/load.py).  This walks that program's operations in order and
evaluates each with numpy: only the ops the edgephi exporter's programs use (after coremltools' default
passes) are implemented; any other op fails loudly, naming it.

Precision: every op computes in float32 and its result is stored in the dtype the program declares (fp16 for
activations), so storage rounding matches Core ML's fp16 tensors; accumulation is fp32 (as on Apple GPUs).
States (the KV cache) persist between predict() calls as fp16 numpy arrays, like an MLState.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

OPS: dict[str, Callable] = {}
_CONST_OPS = ("const", "constexpr_blockwise_shift_scale")


def op(*names):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn

    return deco


def load_program(package: str | Path):
    """The saved package's MIL program (weights read from its weight.bin)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(package))
    weights = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    return spec, load(spec, spec.specificationVersion, file_weights_dir=str(weights))


def np_dtype(var) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(var.dtype))


class Evaluator:
    """evaluator.predict({"input_ids": ..., "position": ...}) -> {"logits": ...}; states kept between calls.

    drop_state_writes: (state name, i) pairs: the i-th coreml_update_state of that state (python indexing, -1 =
    the last) is skipped: its value passes through, the state keeps its old contents.  The tests use it to
    prove that a lost cache write is caught.  (Op names are no handle: loading a package twice in one process
    numbers the second program's ops on from the first's.)
    """

    def __init__(self, package: str | Path, drop_state_writes=frozenset()):
        self.spec, prog = load_program(package)
        self.func = prog.functions["main"]
        self.drop = set()
        for state, i in drop_state_writes:
            writes = [o for o in self.ops("coreml_update_state") if o.inputs["state"].name == state]
            self.drop.add(id(writes[i]))
        self.state_specs = {name: (tuple(v.sym_type.wrapped_type().get_shape()), np.float16)
                            for name, v in self.func.inputs.items() if _is_state(v)}
        self.const_cache: dict[str, Any] = {}
        self.reset_states()

    def ops(self, op_type: str | None = None) -> list:
        return [o for o in self.func.operations if op_type is None or o.op_type == op_type]

    def reset_states(self) -> None:
        self.states = {n: np.zeros(shape, dtype) for n, (shape, dtype) in self.state_specs.items()}

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = {}
        for name, var in self.func.inputs.items():
            if _is_state(var):
                continue
            if name not in inputs:
                raise KeyError(f"missing input {name!r}; the program takes {list(self.func.inputs)}")
            env[name] = np.asarray(inputs[name], dtype=np_dtype(var))
        for o in self.func.operations:
            if o.op_type not in OPS:
                raise NotImplementedError(f"coreml_eval: op {o.op_type!r} ({o.name}) is not implemented")
            if o.op_type in _CONST_OPS and o.name in self.const_cache:
                results = self.const_cache[o.name]
            else:
                args = {k: _value(v, env) for k, v in o.inputs.items()}
                results = OPS[o.op_type](self, o, **args)
                results = results if isinstance(results, tuple) else (results,)
                results = tuple(_store(r, out) for r, out in zip(results, o.outputs))
                if o.op_type in _CONST_OPS:
                    self.const_cache[o.name] = results
            for out, r in zip(o.outputs, results):
                env[out.name] = r
        return {v.name: env[v.name] for v in self.func.outputs}


def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def _value(v, env):
    if isinstance(v, (list, tuple)):
        return [_value(x, env) for x in v]
    if v.name in env:
        return env[v.name]
    if _is_state(v):
        return v.name  # a state argument: its name (the evaluator holds the arrays)
    if v.val is None:
        raise KeyError(f"coreml_eval: no value for {v.name!r} (an op out of order?)")
    return np.asarray(v.val)


def _store(r, out):
    """Round the float32 result to the program's declared dtype (fp16 activations stay fp16)."""
    dt = np_dtype(out)
    r = np.asarray(r)
    return r.astype(dt) if r.dtype != dt else r


def f32(x):
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


# ---- constants -----------------------------------------------------------------------------------------------
@op("const")
def _const(ev, o, **_):
    return np.asarray(o.outputs[0].val)


@op("constexpr_blockwise_shift_scale")
def _blockwise(ev, o, data, scale, offset=None):
    data = np.asarray(data).astype(np.float32)
    if offset is not None:
        data = data - _expand(np.asarray(offset, np.float32), data.shape)
    return data * _expand(np.asarray(scale, np.float32), data.shape)


def _expand(blockwise: np.ndarray, shape) -> np.ndarray:
    for axis, (n, nb) in enumerate(zip(shape, blockwise.shape)):
        blockwise = np.repeat(blockwise, n // nb, axis=axis)
    return blockwise


# ---- states --------------------------------------------------------------------------------------------------
@op("read_state")
def _read_state(ev, o, input):
    return ev.states[input].copy()


@op("coreml_update_state")
def _update_state(ev, o, state, value):
    if id(o) not in ev.drop:
        ev.states[state] = np.asarray(value, np.float16).copy()
    return value


# ---- elementwise -------------------------------------------------------------------------------------------
_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "pow": np.power,
           "maximum": np.maximum, "minimum": np.minimum, "equal": np.equal, "not_equal": np.not_equal,
           "less": np.less, "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
           "logical_and": np.logical_and, "logical_or": np.logical_or}
for _name, _fn in _BINARY.items():
    OPS[_name] = (lambda fn: lambda ev, o, x, y: fn(f32(x), f32(y)))(_fn)

_UNARY = {"sqrt": np.sqrt, "exp": np.exp, "tanh": np.tanh, "abs": np.abs, "logical_not": np.logical_not,
          "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
          "silu": lambda x: x / (1.0 + np.exp(-x)), "relu": lambda x: np.maximum(x, 0)}
for _name, _fn in _UNARY.items():
    OPS[_name] = (lambda fn: lambda ev, o, x, **kw: fn(f32(x)))(_fn)


@op("rsqrt")
def _rsqrt(ev, o, x, epsilon=np.float32(1e-12)):
    return 1.0 / np.sqrt(f32(x) + f32(epsilon))


@op("gelu")
def _gelu(ev, o, x, mode="EXACT"):
    x = f32(x)
    mode = str(mode)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


@op("select")
def _select(ev, o, cond, a, b):
    return np.where(cond, f32(a), f32(b))


@op("cast")
def _cast(ev, o, x, dtype):
    return np.asarray(x)  # _store casts to the declared output dtype (numpy wraps ints like Core ML's casts)


@op("softmax")
def _softmax(ev, o, x, axis=-1):
    x = f32(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max}.items():
    OPS[_name] = (lambda fn: lambda ev, o, x, axes=None, keep_dims=False:
                  fn(f32(x), axis=None if axes is None else tuple(int(a) for a in axes), keepdims=bool(keep_dims)))(_fn)


# ---- linear algebra and normalization ----------------------------------------------------------------------
@op("linear")
def _linear(ev, o, x, weight, bias=None):
    y = f32(x) @ f32(weight).T
    return y if bias is None else y + f32(bias)


@op("matmul")
def _matmul(ev, o, x, y, transpose_x=False, transpose_y=False):
    x, y = f32(x), f32(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return x @ y


@op("layer_norm")
def _layer_norm(ev, o, x, axes, gamma=None, beta=None, epsilon=1e-5):
    x = f32(x)
    ax = tuple(int(a) for a in axes)
    mean = x.mean(axis=ax, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=ax, keepdims=True)
    y = (x - mean) / np.sqrt(var + f32(epsilon))
    if gamma is not None:
        y = y * f32(gamma)
    if beta is not None:
        y = y + f32(beta)
    return y


@op("scaled_dot_product_attention")
def _sdpa(ev, o, query, key, value, attn_mask=None):
    q, k, v = f32(query), f32(key), f32(value)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        scores = np.where(m, scores, -np.inf) if m.dtype == bool else scores + f32(m)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)) @ v


# ---- shapes and indexing -----------------------------------------------------------------------------------
@op("shape")
def _shape(ev, o, x):
    return np.array(np.shape(x), np.int32)


def _slices(shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    n = len(shape)
    stride = [1] * n if stride is None else [int(s) for s in stride]
    begin_mask = [False] * n if begin_mask is None else list(begin_mask)
    end_mask = [False] * n if end_mask is None else list(end_mask)
    squeeze_mask = [False] * n if squeeze_mask is None else list(squeeze_mask)
    idx = []
    for i in range(n):
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        idx.append(b if squeeze_mask[i] else slice(b, e, stride[i]))
    return tuple(idx)


@op("slice_by_index")
def _slice_by_index(ev, o, x, begin, end, **kw):
    x = np.asarray(x)
    return x[_slices(x.shape, begin, end, **kw)]


@op("slice_by_size")
def _slice_by_size(ev, o, x, begin, size):
    x = np.asarray(x)
    return x[tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))]


@op("slice_update")
def _slice_update(ev, o, x, update, begin, end, **kw):
    out = np.array(x, copy=True)
    out[_slices(out.shape, begin, end, **kw)] = update
    return out


@op("gather")
def _gather(ev, o, x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise NotImplementedError("coreml_eval: gather with batch_dims != 0")
    return np.take(np.asarray(x), np.asarray(indices).astype(np.int64), axis=int(axis))


@op("reshape")
def _reshape(ev, o, x, shape):
    x = np.asarray(x)
    shape = [x.shape[i] if int(s) == 0 else int(s) for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("transpose")
def _transpose(ev, o, x, perm):
    return np.transpose(np.asarray(x), [int(p) for p in perm])


@op("concat")
def _concat(ev, o, values, axis, interleave=False):
    if bool(interleave):
        raise NotImplementedError("coreml_eval: concat with interleave=True")
    return np.concatenate([np.asarray(v) for v in values], axis=int(axis))


@op("split")
def _split(ev, o, x, axis, num_splits=None, split_sizes=None):
    x = np.asarray(x)
    axis = int(axis)
    if split_sizes is not None:
        cuts = np.cumsum([int(s) for s in split_sizes])[:-1]
        return tuple(np.split(x, cuts, axis=axis))
    return tuple(np.split(x, int(num_splits), axis=axis))


@op("tile")
def _tile(ev, o, x, reps):
    return np.tile(np.asarray(x), [int(r) for r in reps])


@op("expand_dims")
def _expand_dims(ev, o, x, axes):
    return np.expand_dims(np.asarray(x), tuple(int(a) for a in axes))


@op("squeeze")
def _squeeze(ev, o, x, axes=None):
    return np.squeeze(np.asarray(x), axis=None if axes is None else tuple(int(a) for a in axes))


@op("range_1d")
def _range_1d(ev, o, start, end, step):
    return np.arange(start, end, step)
