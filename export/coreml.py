"""Core ML exporter: a stateful ML program (iOS 18 / macOS 15) with int4 block-wise or fp16 weights.

The MIL program is built straight from PhiSpec and the tensor stream (coreml_graph.py; no torch), converted
with coremltools' default pass pipeline in fp16 and saved as ``coreml/model.mlpackage``.  coremltools converts
and saves on Linux too; only prediction needs macOS 15+.

Options: ``context_length`` (cache size; default min(max_position_embeddings, DEFAULT_CONTEXT), since the
cache is preallocated: 4096 tokens of Phi-3-mini already take 2 x 384 MiB of fp16).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgephi.export.registry import FormatResult, register, relpath
from edgephi.weights import Checkpoint

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096
PACKAGE = "model.mlpackage"
QUANT_NAMES = {4: "int4-b32-sym", 16: "f16"}
INPUT_IDS, POSITION, LOGITS, STATES = "input_ids", "position", "logits", ("key_cache", "value_cache")
# user-defined metadata keys written into the package (and read back by the backend)
META_PREFIX = "edgephi."


def _context_length(spec, context_length) -> int:
    if context_length is None:
        return min(spec.max_position_embeddings, DEFAULT_CONTEXT)
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"coreml export: context_length={context_length!r}: must be a positive integer")
    if context_length > spec.max_position_embeddings:
        raise ValueError(f"coreml export: context_length={context_length} exceeds the model's "
                         f"max_position_embeddings={spec.max_position_embeddings}")
    return context_length


def convert(prog, spec, context: int):
    """MIL program -> MLModel (not loaded: on Linux Core ML cannot load it for prediction).

    The states come from the program's StateTensorSpec inputs (ct.convert takes `states=` only for torch).
    """
    import coremltools as ct

    inputs = [ct.TensorType(name=INPUT_IDS, shape=ct.Shape((1, ct.RangeDim(1, context, default=1))),
                            dtype=np.int32),  # an explicit upper bound, or coremltools makes it 2
              ct.TensorType(name=POSITION, shape=(1,), dtype=np.int32)]
    # const_deduplication would merge the (identical) placeholders of deferred weights; real checkpoints have no
    # duplicate tensors to merge (tied embeddings share one const by construction)
    passes = ct.PassPipeline.DEFAULT
    passes.remove_passes(["common::const_deduplication"])
    return ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, inputs=inputs,
                      compute_precision=ct.precision.FLOAT16, skip_model_load=True, pass_pipeline=passes)


def metadata(spec, bits: int, context: int) -> dict[str, str]:
    """User-defined metadata: everything a runtime needs to drive the program without the manifest."""
    import edgephi

    return {
        META_PREFIX + "version": getattr(edgephi, "__version__", "0"),
        META_PREFIX + "model_type": spec.model_type,
        META_PREFIX + "name": spec.name or "",
        META_PREFIX + "bits": str(bits),
        META_PREFIX + "quant": QUANT_NAMES[bits],
        META_PREFIX + "context_length": str(context),
        META_PREFIX + "vocab_size": str(spec.vocab_size),
        META_PREFIX + "eos_token_id": json.dumps(list(spec.eos_token_id)),
        META_PREFIX + "spec": json.dumps(spec.to_dict(), sort_keys=True),
    }


def build(ckpt_dir, spec, *, bits: int, context: int, progress=None, drop_cache_write_layer: int | None = None,
          deferred: bool = True):
    """(MLModel, Weights) for a checkpoint; save it with save_package.

    deferred (the default) keeps the weights out of the program until save_package writes them into the saved
    blob (coreml_blob.py); tests use deferred=False as the oracle and drop_cache_write_layer to prove they catch a
    lost cache update.
    """
    from .coreml_graph import build_program
    from .coreml_layers import Weights

    if bits not in QUANT_NAMES:
        raise ValueError(f"coreml export: bits={bits!r}; supported: {', '.join(map(str, QUANT_NAMES))}")
    ckpt = Checkpoint(ckpt_dir)
    ckpt.check(spec)  # missing tensors / wrong shapes fail here, naming the tensor
    weights = Weights(ckpt, bits, progress, total=len(spec.tensor_shapes()), deferred=deferred)
    prog = build_program(spec, weights, context, drop_cache_write_layer=drop_cache_write_layer)
    return convert(prog, spec, context), weights


def save_package(model, weights, path: Path) -> None:
    """Save the package, then write the deferred weights into its blob."""
    from .coreml_blob import fill

    model.save(str(path))
    fill(path, weights)


@register("coreml", bits=(4, 16))
def export(ckpt_dir, spec, out_dir, *, bits: int, progress=None, context_length: int | None = None,
           **options) -> FormatResult:
    if options:
        raise ValueError(f"coreml export: unknown options {', '.join(sorted(options))}; known: context_length")
    out_dir = Path(out_dir)
    context = _context_length(spec, context_length)
    model, weights = build(ckpt_dir, spec, bits=bits, context=context, progress=progress)
    import edgephi

    model.author = "edgephi"
    model.version = getattr(edgephi, "__version__", "0")
    model.short_description = (f"{spec.name or spec.model_type}: {QUANT_NAMES[bits]} weights, stateful KV cache "
                               f"of {context} tokens (inputs input_ids, position; output logits)")
    model.user_defined_metadata.update(metadata(spec, bits, context))
    path = out_dir / PACKAGE
    save_package(model, weights, path)
    log.info("coreml: wrote %s (%s, context %d)", path, QUANT_NAMES[bits], context)
    return FormatResult(format="coreml", files=[relpath(path, out_dir)], bits=bits, quant=QUANT_NAMES[bits],
                        entry=relpath(path, out_dir),
                        extra={"context_length": context, "inputs": [INPUT_IDS, POSITION], "outputs": [LOGITS],
                               "states": list(STATES), "minimum_deployment_target": "iOS18",
                               "fp16_fallback": weights.fp16_fallback})
