"""Core ML exporter: the architecture lowered to a stateful ML program (export/lower_coreml.py) with int4
block-wise or fp16 weights, saved as the format contract says (edgephi/formats/coreml.py).

The program is built from the spec alone, with zero-strided placeholders for the weights, converted with
coremltools' default pass pipeline in fp16 and saved; coreml_blob.py then streams the weights from the checkpoint
into the saved blob.  coremltools converts and saves on Linux too; only prediction needs macOS 15+.

Options: ``n_ctx`` (cache length; default edgephi.formats.default_n_ctx of the model's context, since the cache
is preallocated: 4096 tokens of Phi-3-mini already take 2 x 384 MiB of fp16).
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np

from edgephi.formats import check_n_ctx
from edgephi.formats import coreml as fmt

from .registry import FormatResult, quiet_libraries, register, relpath
from .source import Source

log = logging.getLogger(__name__)


def convert(prog, n_ctx: int):
    """MIL program -> MLModel (not loaded: on Linux Core ML cannot load it for prediction).

    The states come from the program's StateTensorSpec inputs (ct.convert takes `states=` only for torch).
    """
    import coremltools as ct

    inputs = [ct.TensorType(name=fmt.INPUT_IDS, shape=ct.Shape((1, ct.RangeDim(1, n_ctx, default=1))),
                            dtype=np.int32),  # an explicit upper bound, or coremltools makes it 2
              ct.TensorType(name=fmt.POSITION, shape=(1,), dtype=np.int32)]
    # const_deduplication would merge the (identical) placeholders of deferred weights; real checkpoints have no
    # duplicate tensors to merge (tied embeddings share one const by construction)
    passes = ct.PassPipeline.DEFAULT
    passes.remove_passes(["common::const_deduplication"])
    with _quiet_passes():
        return ct.convert(prog, convert_to="mlprogram", inputs=inputs, skip_model_load=True, pass_pipeline=passes,
                          minimum_deployment_target=getattr(ct.target, fmt.DEPLOYMENT_TARGET),
                          compute_precision=ct.precision.FLOAT16)


@contextlib.contextmanager
def _quiet_passes():
    """coremltools draws a progress bar per MIL pass pipeline; edgephi shows its own (kept with --verbose)."""
    from coremltools.converters.mil.mil.passes import pass_pipeline

    if logging.getLogger("edgephi").isEnabledFor(logging.INFO):
        yield
        return
    bar = pass_pipeline.tqdm
    pass_pipeline.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        pass_pipeline.tqdm = bar


def metadata(spec, bits: int, n_ctx: int) -> dict[str, str]:
    """User-defined metadata: everything a runtime needs to drive the program without the manifest."""
    import edgephi

    m = fmt.META_PREFIX
    return {
        m + "version": edgephi.__version__, m + "model_type": spec.model_type, m + "name": spec.name or "",
        m + "bits": str(bits), m + "quant": fmt.QUANT_NAMES[bits], fmt.N_CTX_KEY: str(n_ctx),
        m + "vocab_size": str(spec.vocab_size), m + "eos_token_id": json.dumps(list(spec.eos_token_id)),
        m + "spec": json.dumps(spec.to_dict(), sort_keys=True),
    }


def _refuses(spec) -> str | None:
    """The Core ML lowering imports coremltools: check its ops without importing it (names only)."""
    from edgephi import arch

    missing = sorted(arch.ops_used(spec) - LOWERED_OPS)
    return (f"{arch.get(spec.model_type).description} needs {', '.join(missing)}, which the Core ML export cannot "
            "express yet") if missing else None


# the op vocabulary export/lower_coreml.py implements (kept here so that checking needs no coremltools)
LOWERED_OPS = frozenset({"embed", "rms_norm", "layer_norm", "linear", "split_linear", "attention", "act", "mul",
                         "add", "logits", "embed(scale)", "attention(scale)", "attention(block_sparse)", "act(limit)",
                         "logits(scale)", "logits(masked)"})


def build(src: Source, *, bits: int, n_ctx: int, drop_cache_write_layer: int | None = None, deferred: bool = True):
    """(MLModel, Weights) for a checkpoint; save it with save_package.

    deferred (the default) keeps the weights out of the program until save_package writes them into the saved
    blob (coreml_blob.py); tests use deferred=False as the oracle and drop_cache_write_layer to prove they catch a
    lost cache update.
    """
    from .coreml_layers import Weights
    from .lower_coreml import build_program

    if bits not in fmt.QUANT_NAMES:
        raise ValueError(f"coreml export: bits={bits!r}; supported: {', '.join(map(str, fmt.QUANT_NAMES))}")
    weights = Weights(src.tensors, bits, deferred=deferred)
    prog = build_program(src.spec, weights, n_ctx, drop_cache_write_layer=drop_cache_write_layer)
    return convert(prog, n_ctx), weights


def save_package(model, weights, path: Path) -> None:
    """Save the package, then write the deferred weights into its blob."""
    from .coreml_blob import fill

    model.save(str(path))
    fill(path, weights)


@register(fmt.FORMAT, bits=tuple(fmt.QUANT_NAMES), requires=("coremltools",), refuses=_refuses)
def export(src: Source, out_dir, *, bits: int, n_ctx: int | None = None, **options) -> FormatResult:
    if options:
        raise ValueError(f"coreml export: unknown options {', '.join(sorted(options))}; known: n_ctx")
    import edgephi

    spec, out_dir = src.spec, Path(out_dir)
    n_ctx = check_n_ctx(n_ctx, spec.max_position_embeddings, "coreml export")
    with quiet_libraries("coremltools"):  # no macOS runtime here, an untested torch: said at import, not ours
        model, weights = build(src, bits=bits, n_ctx=n_ctx)
    model.author = "edgephi"
    model.version = edgephi.__version__
    model.short_description = (f"{spec.name or spec.model_type}: {fmt.QUANT_NAMES[bits]} weights, stateful KV "
                               f"cache of {n_ctx} tokens (inputs input_ids, position; output logits)")
    model.user_defined_metadata.update(metadata(spec, bits, n_ctx))
    path = out_dir / fmt.PACKAGE
    save_package(model, weights, path)
    log.info("coreml: wrote %s (%s, n_ctx %d)", path, fmt.QUANT_NAMES[bits], n_ctx)
    return FormatResult(format=fmt.FORMAT, files=[relpath(path, out_dir)], bits=bits, quant=fmt.QUANT_NAMES[bits],
                        entry=relpath(path, out_dir),
                        extra={"n_ctx": n_ctx, "inputs": [fmt.INPUT_IDS, fmt.POSITION], "outputs": [fmt.LOGITS],
                               "states": list(fmt.STATES), "minimum_deployment_target": fmt.DEPLOYMENT_TARGET,
                               "fp16_fallback": weights.fp16_fallback})
