"""The Core ML format (bundle/coreml/model.mlpackage): one stateful ML program (iOS 18 / macOS 15 opset).

inputs   input_ids (1, T) int32, T in 1..n_ctx; position (1,) int32 = the index of input_ids[0] in the sequence
states   key_cache, value_cache (layers, n_kv, n_ctx, head_dim) float16, preallocated
output   logits (1, T, V) float32

The program masks by position (a query at p sees cache slots k <= p, and k > p - window with a sliding window,
additive MASK_VALUE), so after a rewind the stale slots past n_past need no clearing.  The package's user-defined
metadata (META_PREFIX keys) describes it without the manifest; N_CTX_KEY is the cache length a runtime reads.
"""
from __future__ import annotations

FORMAT = "coreml"
PACKAGE = "model.mlpackage"
DEFAULT_ENTRY = f"{FORMAT}/{PACKAGE}"
INPUT_IDS, POSITION, LOGITS = "input_ids", "position", "logits"
STATES = ("key_cache", "value_cache")
QUANT_NAMES = {4: "int4-b32-sym", 16: "f16"}
DEPLOYMENT_TARGET = "iOS18"
MIN_MACOS = (15,)  # stateful programs (MLState) need macOS 15 / iOS 18
META_PREFIX = "edgephi."
N_CTX_KEY = META_PREFIX + "n_ctx"
