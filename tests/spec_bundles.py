"""Tiny 16-bit bundles (ONNX, GGUF, onnx-npu) shared by the speculation, prompt-cache and KV-memory tests."""
from __future__ import annotations

import dataclasses

import pytest

ALL = ("onnx", "gguf", "onnx-npu")


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoint, tmp_path_factory):
    """tiny_bundles(variant, formats=ALL) -> bundle path (exported once per session)."""
    from edgephi.export.bundle import export_bundle

    cache: dict = {}

    def get(variant: str, formats=ALL):
        key = (variant, tuple(formats))
        have = next((v for k, v in cache.items() if k[0] == variant and set(formats) <= set(k[1])), None)
        if have is not None:
            return have
        options = {"onnx-npu": {"n_ctx": 96, "chunk": 16, "compile": False}} if "onnx-npu" in formats else None
        out, _ = export_bundle(str(tiny_checkpoint(variant)), tmp_path_factory.mktemp(variant) / "b",
                               formats=formats, bits=16, options=options)
        cache[key] = out
        return out

    return get


def load(path, fmt, **options):
    """edgephi.load on one format, one thread (tests run beside others on 2 cores; llama.cpp's and onnxruntime's
    spinning threads lose most under contention); onnx-npu on onnxruntime-qnn's x86 HTP emulation (never
    reported as an NPU)."""
    import edgephi
    from edgephi.devices import probe

    options.setdefault("threads", 1)

    if fmt == "onnx-npu":
        fake = dataclasses.replace(probe(), qnn_htp="hardware")
        return edgephi.load(path, format=fmt, probe=fake, device="npu", allow_emulated=True, **options)
    return edgephi.load(path, format=fmt, **options)
