"""Phi-3.5-MoE (model_type "phimoe"): one architecture file (edgephi/arch/phimoe.py) plus its op in the lowerings.

A tiny PhimoeForCausalLM made with transformers' own class (LayerNorm, biased q/k/v/o and lm_head, grouped KV
heads, 4 experts with sparsemixer top-2 routing, LongRoPE with a short and a long mscale switching at 64) is the
reference.  Past original_max_position_embeddings transformers 5's PhimoeRotaryEmbedding keeps the short factors
(it calls the LongRoPE init without the sequence length) while edgephi switches to the long ones as Phi-3 does;
so transformers is compared below that length, and edgephi's own lowerings against each other past it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import tiny
import vocab_build
from edgephi import arch
from edgephi.export.bundle import export_bundle
from edgephi.export.lower_numpy import NumpyModel, sparsemixer
from edgephi.export.onnx import export as onnx_export
from edgephi.export.onnx_quant import dequantize_int4, quantize_int4
from edgephi.export.source import Source

PROMPT, STEPS, ORIGINAL_MAX = 40, 8, 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch
    import transformers

    rng = np.random.default_rng(3)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIGINAL_MAX,
            "short_factor": np.round(1 + rng.random(32) * 0.5, 4).tolist(), "short_mscale": 1.1,
            "long_factor": np.round(np.sort(1 + rng.random(32) * 6), 4).tolist(), "long_mscale": 1.3}
    config = transformers.PhimoeConfig(
        vocab_size=32064, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        attention_bias=True, lm_head_bias=True, sliding_window=None, rope_parameters=rope, bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000, initializer_range=0.08)
    torch.manual_seed(0)
    model = transformers.PhimoeForCausalLM(config).eval()
    tiny._randomize_norms_and_biases(model, 1)
    out = tmp_path_factory.mktemp("phimoe") / "phi-3.5-moe"
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": tiny.PHI3_STOP_IDS}))
    vocab_build.write_phi3_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def reference(checkpoint):
    return tiny.load_reference(checkpoint)


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_spec_and_checkpoint(checkpoint):
    src = Source.open(checkpoint)
    spec = src.spec
    assert spec.model_type == "phimoe" and spec.num_local_experts == 4 and spec.num_experts_per_tok == 2
    assert spec.attention_bias and spec.lm_head_bias and spec.router_jitter_noise == pytest.approx(0.01)
    assert spec.rope_scaling.attention_factor == pytest.approx(1.1)
    assert spec.rope_scaling.long_attention_factor == pytest.approx(1.3)


def test_sparsemixer_is_transformers_eval_routing():
    import torch
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as reference_mixer

    scores = np.random.default_rng(0).normal(0, 0.02, (64, 16)).astype(np.float32)
    scores[::3, 5] += 0.5  # clear winners too, not only near ties
    want_w, want_e = reference_mixer(torch.from_numpy(scores), jitter_eps=0.01, training=False)
    got_w, got_e = sparsemixer(scores, 0.01)
    assert np.array_equal(got_e, want_e.numpy())
    np.testing.assert_allclose(got_w, want_w.numpy(), rtol=1e-5)


def test_numpy_lowering_matches_transformers(checkpoint, reference):
    src = Source.open(checkpoint)
    prompt = tiny.random_prompt(PROMPT, src.spec.vocab_size)
    want_tokens, want = tiny.reference_greedy(reference, prompt, STEPS)
    tokens, logits = tiny.session_greedy(NumpyModel(src.tensors, src.spec), prompt, STEPS)
    assert rel_err(logits, want) <= 1e-4 and tokens == want_tokens


@pytest.mark.parametrize("bits,tol", [(32, 1e-3), (16, 2e-2)])
def test_onnx_matches_transformers(bits, tol, checkpoint, reference, tmp_path):
    from edgephi.backends.onnx import OnnxSession

    src = Source.open(checkpoint)
    onnx_export(src, tmp_path, bits=bits)
    prompt = tiny.random_prompt(PROMPT, src.spec.vocab_size, seed=1)
    want_tokens, want = tiny.reference_greedy(reference, prompt, STEPS)
    tokens, logits = tiny.session_greedy(OnnxSession(tmp_path, n_ctx=128, threads=1), prompt, STEPS)
    assert rel_err(logits, want) <= tol and tokens == want_tokens


def test_onnx_int4_matches_the_dequantized_model_past_the_longrope_switch(checkpoint, tmp_path):
    """QMoE (block-wise int4 experts) and MatMulNBits, computed exactly (accuracy_level 0), against the numpy
    lowering on the same rounded weights; the prompt and the decode cross original_max_position_embeddings."""
    from edgephi.backends.onnx import OnnxSession

    def rounded(role, name, w):
        if role in ("linear", "logits"):
            return dequantize_int4(quantize_int4(w, 32, True))
        return w.astype(np.float16).astype(np.float32) if role == "embed" else w  # the router stays float32

    src = Source.open(checkpoint)
    onnx_export(src, tmp_path, bits=4, accuracy_level=0)
    prompt = tiny.random_prompt(ORIGINAL_MAX - 4, src.spec.vocab_size, seed=2)
    want_tokens, want = tiny.session_greedy(NumpyModel(src.tensors, src.spec, rounded), prompt, STEPS)
    tokens, logits = tiny.session_greedy(OnnxSession(tmp_path, n_ctx=128, threads=1), prompt, STEPS)
    assert rel_err(logits, want) <= 1e-3 and tokens == want_tokens


def test_bundle_leaves_out_formats_that_cannot_hold_it(checkpoint, tmp_path, caplog):
    with pytest.raises(NotImplementedError, match="sparse_moe"):
        export_bundle(str(checkpoint), tmp_path / "coreml", formats=("coreml",), bits=16)
    with pytest.raises(NotImplementedError, match="sparse_moe"):
        export_bundle(str(checkpoint), tmp_path / "npu", formats=("onnx-npu",), bits=16)
    assert not (tmp_path / "coreml").exists() and not (tmp_path / "npu").exists()
    out, manifest = export_bundle(str(checkpoint), tmp_path / "default", bits=16)
    assert set(manifest.formats) == {"onnx", "gguf"} and "leaving out coreml" in caplog.text


class LlamaCppPhimoe(NumpyModel):
    """What llama.cpp's phimoe graph computes (src/models/phi3.cpp with MoE): RMSNorm plus the LayerNorm's bias,
    the top two experts by softmax renormalized to sum 1, and LongRoPE's factors chosen once from the context
    size (long: the context it allocates, rounded up to 256, exceeds original_max_position_embeddings)."""

    long_factors = True

    def layer_norm(self, x, weight: str, bias: str):
        return super().rms_norm(x, weight) + self.w("bias", bias)

    def sparse_moe(self, x, router: str, experts):
        p = np.exp(x @ self.w("router", router).T)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.zeros_like(x)
        for t in range(x.shape[0]):
            top = np.argsort(-p[t])[:2]
            for w, e in zip(p[t, top] / p[t, top].sum(), top):
                gate, up, down = experts[e]
                h = self.act(x[t] @ self.w("linear", gate).T, "silu") * (x[t] @ self.w("linear", up).T)
                out[t] += w * (h @ self.w("linear", down).T)
        return out

    def forward(self, ids, all_logits=False):
        self.spec = dataclasses.replace(self.spec, rope_scaling=dataclasses.replace(
            self.spec.rope_scaling, long_attention_factor=self.spec.rope_scaling.attention_factor))
        original, arch.uses_long_rope = arch.uses_long_rope, lambda spec, n: True
        try:
            return super().forward(ids, all_logits)
        finally:
            arch.uses_long_rope = original


def test_gguf_is_llama_cpps_phimoe_layout(checkpoint, reference, tmp_path):
    """llama.cpp's own phimoe tensors (a layer's experts stacked into 3-D tensors) and metadata.  llama.cpp runs
    the file exactly as its phimoe graph says (LlamaCppPhimoe, within 2%), which is not the model's arithmetic:
    RMSNorm where Phi-3.5-MoE has LayerNorm, a renormalized top-2 softmax where it has sparsemixer; so llama.cpp's
    logits are not held to transformers' (the gap is printed)."""
    gguf = pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    from edgephi.export.registry import get

    src = Source.open(checkpoint)
    res = get("gguf")(src, tmp_path, bits=16)
    path = tmp_path.parent / res.entry
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    assert r.fields["general.architecture"].contents() == "phimoe"
    assert r.fields["phimoe.expert_count"].contents() == 4 and r.fields["phimoe.expert_used_count"].contents() == 2
    assert list(tensors["blk.0.ffn_gate_exps.weight"].shape) == [256, 128, 4]  # GGUF order: in, out, expert
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [128, 256, 4]
    w1 = src.tensors.read("model.layers.0.block_sparse_moe.experts.2.w1.weight")
    np.testing.assert_allclose(tensors["blk.0.ffn_gate_exps.weight"].data[2], w1.astype(np.float16), rtol=0)
    assert "output.bias" in tensors and "blk.0.attn_q.bias" in tensors
    prompt = tiny.random_prompt(PROMPT, src.spec.vocab_size, seed=3)
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    llm.eval(prompt)
    got = np.array([llm.scores[k] for k in range(len(prompt))])
    assert rel_err(got, LlamaCppPhimoe(src.tensors, src.spec).forward(prompt, all_logits=True)) <= 0.02
    gap = rel_err(got[-1], tiny.reference_logits(reference, prompt)[-1])
    print(f"llama.cpp's phimoe graph vs transformers (the model): logits differ by {gap:.0%} of the largest")


def _traced_export_peak(checkpoint: Path, tmp_path: Path, experts: int, bits: int) -> int:
    """Peak traced (numpy) memory of an ONNX export of a 1-layer copy of the model with `experts` experts of
    intermediate size 2048 (one expert's three weights: 6 MiB in float32)."""
    import tracemalloc

    from edgephi.spec import PhiSpec
    from edgephi.weights import save_safetensors

    config = json.loads((checkpoint / "config.json").read_text())
    config.update(intermediate_size=2048, num_local_experts=experts, num_hidden_layers=1)
    big = tmp_path / f"e{experts}"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (big / f).write_bytes((checkpoint / f).read_bytes())
    spec = PhiSpec.from_hf_config(big)
    rng = np.random.default_rng(0)
    save_safetensors(big / "model.safetensors", spec.tensor_shapes(),
                     lambda name: rng.normal(0, 0.02, spec.tensor_shapes()[name]).astype(np.float32), dtype="F16")
    src = Source.open(big)
    tracemalloc.start()
    try:
        onnx_export(src, tmp_path / f"onnx-e{experts}", bits=bits)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("bits", [4, 16])
def test_export_streams_expert_by_expert(checkpoint, tmp_path, bits):
    """Peak memory of the ONNX export does not grow with the number of experts: 8 experts of 6 MiB cost less
    than one expert more than 2 do (holding a layer's experts would add 36 MiB)."""
    expert = 3 * 2048 * 256 * 4
    two, eight = (_traced_export_peak(checkpoint, tmp_path, n, bits) for n in (2, 8))
    assert eight - two < expert, f"peak {two / 2**20:.1f} MiB with 2 experts, {eight / 2**20:.1f} MiB with 8"
