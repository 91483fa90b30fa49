"""GGUF export and the llama.cpp backend, compared with transformers on tiny random checkpoints.

The 16-bit files are read by llama-cpp-python directly (no edgephi code on the reading side) and through edgephi's
backend (which applies Phi-3's sliding window that llama.cpp 0.3.x leaves off).  LongRoPE variants are prompted
past original_max_position_embeddings (64) so that transformers and llama.cpp (n_ctx > 64) both use the long factors.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import pytest

import tiny

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (edgephi[gguf])")
gguf = pytest.importorskip("gguf")

from edgephi.backends.llamacpp import LlamaCppBackend, open_gguf  # noqa: E402
from edgephi.devices import Probe  # noqa: E402
from edgephi.export import gguf as gguf_export  # noqa: E402
from edgephi.export.registry import get  # noqa: E402
from edgephi.export.source import Source  # noqa: E402
from edgephi.formats.gguf import quiet_llama_logs  # noqa: E402
from edgephi.spec import PhiSpec  # noqa: E402
from edgephi.weights import CheckpointError  # noqa: E402

PROMPT, STEPS, THREADS = 80, 12, 2
REL_TOL = 0.02  # fp16 weights and KV cache vs transformers fp32: max |diff| <= 2% of max |logit|


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """exported(variant, quant="f16") -> (checkpoint dir, spec, GGUF path), made once per module."""
    cache: dict = {}

    def get_file(variant: str, quant: str = "f16"):
        key = (variant, quant)
        if key not in cache:
            ckpt = tiny_checkpoint(variant)
            spec = PhiSpec.from_hf_config(ckpt)
            if quant == "f16":
                out = tmp_path_factory.mktemp(f"gguf-{variant}") / "gguf"
                out.mkdir()
                res = get("gguf")(Source.open(ckpt), out, bits=16)
                path = out.parent / res.entry
            else:  # quantize the f16 file (what export(bits=4) does after writing it)
                _, _, f16 = get_file(variant)
                path = gguf_export.quantize(f16, f16.with_name(f"model-{quant}.gguf"), quant, THREADS)
            cache[key] = (ckpt, spec, path)
        return cache[key]

    return get_file


def _llama(path, n_ctx=256):
    quiet_llama_logs()
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, threads=THREADS, verbose=False)


def _direct_greedy(path, prompt, steps):
    """Greedy decode with llama-cpp-python's Llama.eval (its KV cache); logits of each step (steps, V)."""
    llm = _llama(path)
    llm.eval(prompt)
    logits = [np.array(llm.scores[llm.n_tokens - 1])]
    toks = []
    for _ in range(steps - 1):
        toks.append(int(np.argmax(logits[-1])))
        llm.eval([toks[-1]])
        logits.append(np.array(llm.scores[llm.n_tokens - 1]))
    toks.append(int(np.argmax(logits[-1])))
    return toks, np.stack(logits)


def _rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("variant", list(tiny.VARIANTS))
def test_f16_read_by_llamacpp_matches_transformers(variant, exported, reference_model):
    ckpt, spec, path = exported(variant)
    n_prompt = PROMPT
    if spec.effective_sliding_window:  # llama.cpp alone has no window: compare inside it (past it: next test)
        n_prompt = spec.effective_sliding_window - STEPS
    prompt = tiny.random_prompt(n_prompt, spec.vocab_size, seed=1)
    ref_toks, ref_logits = tiny.reference_greedy(reference_model(ckpt), prompt, STEPS)
    toks, logits = _direct_greedy(path, prompt, STEPS)
    assert _rel_err(logits, ref_logits) <= REL_TOL
    assert toks == ref_toks


def test_sliding_window_through_backend(exported, reference_model):
    ckpt, spec, path = exported("phi-3-mini-4k")
    assert spec.effective_sliding_window == 48
    prompt = tiny.random_prompt(PROMPT, spec.vocab_size, seed=2)
    ref_toks, ref_logits = tiny.reference_greedy(reference_model(ckpt), prompt, STEPS)

    def run(mode):
        s = open_gguf(path, spec, threads=THREADS, sliding_window=mode)
        out = [s.forward(prompt)] + [s.forward([t]) for t in ref_toks[:-1]]
        s.close()
        return np.stack(out)

    exact = run("exact")
    assert _rel_err(exact, ref_logits) <= REL_TOL
    assert exact.argmax(-1).tolist() == ref_toks
    # llama.cpp's own behaviour (no window) departs from the model past the window: the test above is meaningful
    assert _rel_err(run("off"), ref_logits) > 0.1


def test_backend_longrope_and_gqa(exported, reference_model):
    for variant in ("phi-4-mini", "phi-3-medium"):
        ckpt, spec, path = exported(variant)
        prompt = tiny.random_prompt(PROMPT, spec.vocab_size, seed=3)
        ref = tiny.reference_logits(reference_model(ckpt), prompt)
        s = open_gguf(path, spec, threads=THREADS)
        got = s.forward(prompt, all_logits=True)
        assert got.shape == ref.shape
        assert _rel_err(got, ref) <= REL_TOL


def test_flash_attention_on_and_off_match_transformers(exported, reference_model):
    """The llamacpp backend's flash_attn option (llama.cpp's CPU FA kernel is slower at decode on long contexts):
    both settings give transformers' logits, prefill and decode; a wrong value is refused before loading."""
    ckpt, spec, path = exported("phi-4-mini")  # partial rotary and grouped KV heads
    prompt = tiny.random_prompt(PROMPT, spec.vocab_size, seed=5)
    ref = tiny.reference_logits(reference_model(ckpt), prompt)
    for mode in ("on", "off"):
        s = open_gguf(path, spec, threads=THREADS, flash_attn=mode)
        got = np.concatenate([s.forward(prompt[:-4], all_logits=True)] + [s.forward([t])[None] for t in prompt[-4:]])
        s.close()
        assert _rel_err(got, ref) <= REL_TOL, mode
    with pytest.raises(ValueError, match="flash_attn='fast'; choose one of auto, on, off"):
        open_gguf(path, spec, threads=THREADS, flash_attn="fast")


@pytest.mark.parametrize("variant", ["phi-3-mini-4k", "phi-2"])
def test_session_rewind_and_reuse(variant, exported):
    _, spec, path = exported(variant)
    prompt = tiny.random_prompt(PROMPT, spec.vocab_size, seed=4)
    extra = [300, 301, 302]
    s = open_gguf(path, spec, threads=THREADS)
    s.forward(prompt[:60])
    s.forward(prompt[60:])
    a = s.forward(extra, all_logits=True)
    assert (s.n_past, s.n_evaluated) == (PROMPT + 3, PROMPT + 3)
    s.rewind(PROMPT)  # a chat's next turn: only the new tokens are evaluated
    b = s.forward(extra, all_logits=True)
    assert (s.n_past, s.n_evaluated) == (PROMPT + 3, PROMPT + 6)
    np.testing.assert_array_equal(a, b)
    s.rewind(50)  # back inside the window: the archived keys become visible again
    c = s.forward(extra, all_logits=True)
    fresh = open_gguf(path, spec, threads=THREADS)
    fresh_last = fresh.forward(prompt[:50])
    c_fresh = fresh.forward(extra, all_logits=True)
    assert _rel_err(c, c_fresh) <= 2e-3  # same cache contents; llama.cpp's batch sizes differ (60 vs 50)
    s.reset()
    assert s.n_past == 0
    assert _rel_err(s.forward(prompt[:50]), fresh_last) <= 2e-3
    with pytest.raises(ValueError, match="rewind"):
        s.rewind(51)


@pytest.mark.parametrize("quant", ["q4_k_m", "q4_0"])
def test_q4_files_load_and_stay_close(quant, exported, reference_model, capsys):
    kls = {}
    for variant in ("phi-3-mini-128k", "phi-2"):  # SentencePiece + LongRoPE, GPT-2 BPE + biases
        ckpt, spec, path = exported(variant, quant)
        assert path.stat().st_size < 0.45 * exported(variant)[2].stat().st_size  # 4.5-6.6 bits vs 16
        prompt = tiny.random_prompt(PROMPT, spec.vocab_size, seed=5)
        ref = tiny.reference_logits(reference_model(ckpt), prompt)
        s = open_gguf(path, spec, threads=THREADS)
        got = s.forward(prompt, all_logits=True)
        lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
        lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
        kls[variant] = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    with capsys.disabled():
        print(f"\n{quant}: mean KL(transformers fp32 || llama.cpp {quant}) per token: "
              + ", ".join(f"{v} {k:.4f}" for v, k in kls.items()))
    # random weights are the worst case for 4-bit (no outliers, no structure): measured 0.02-0.25 here
    for k in kls.values():
        assert np.isfinite(k) and 0 <= k < 0.5


@pytest.mark.parametrize("variant", list(tiny.VARIANTS))
def test_metadata_matches_spec(variant, exported):
    _, spec, path = exported(variant)
    r = gguf.GGUFReader(path)

    def f(key):
        return r.fields[key].contents()

    arch = f("general.architecture")
    assert arch == {"phi": "phi2", "phi3": "phi3"}[spec.model_type]
    assert f(f"{arch}.context_length") == spec.max_position_embeddings
    assert f(f"{arch}.embedding_length") == spec.hidden_size
    assert f(f"{arch}.feed_forward_length") == spec.intermediate_size
    assert f(f"{arch}.block_count") == spec.num_hidden_layers
    assert f(f"{arch}.attention.head_count") == spec.num_attention_heads
    assert f(f"{arch}.attention.head_count_kv") == spec.num_key_value_heads
    assert f(f"{arch}.rope.dimension_count") == spec.rotary_dim
    phi3 = spec.model_type == "phi3"
    eps_key = "layer_norm_rms_epsilon" if phi3 else "layer_norm_epsilon"
    assert f(f"{arch}.attention.{eps_key}") == pytest.approx(spec.norm_eps)
    names = {t.name: t for t in r.tensors}
    assert ("output.weight" in names) == (not spec.tie_word_embeddings)
    assert len(r.tensors) == len(spec.tensor_shapes()) + (2 if spec.rope_scaling else 0)
    if phi3:
        assert f(f"{arch}.attention.sliding_window") == (spec.sliding_window or 0)
        assert f(f"{arch}.rope.scaling.original_context_length") == (spec.original_max_position_embeddings
                                                                     or spec.max_position_embeddings)
    if spec.rope_scaling is not None:
        rs = spec.rope_scaling
        np.testing.assert_allclose(names["rope_factors_long.weight"].data, rs.long_factor, rtol=1e-6)
        np.testing.assert_allclose(names["rope_factors_short.weight"].data, rs.short_factor, rtol=1e-6)
        assert f(f"{arch}.rope.scaling.attn_factor") == pytest.approx(rs.attention_factor, rel=1e-6)
    tok_model = f("tokenizer.ggml.model")
    assert tok_model == ("llama" if (phi3 and spec.vocab_size == 32064) else "gpt2")
    assert len(r.fields["tokenizer.ggml.tokens"].data) == spec.vocab_size  # .data: no per-token decoding
    if tok_model == "gpt2":
        assert f("tokenizer.ggml.pre") == ("phi-2" if spec.model_type == "phi" else "gpt-2")
        assert len(r.fields["tokenizer.ggml.merges"].data) > 1000


def test_bad_inputs(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("phi-2")
    src = Source.open(ckpt)
    out = tmp_path / "gguf"
    out.mkdir()
    export = get("gguf")
    # an architecture with no architecture file (so no llama.cpp name)
    other = Source.open(ckpt)
    other.spec = dataclasses.replace(src.spec, model_type="phi4flash")
    with pytest.raises(NotImplementedError, match="phi4flash"):
        export(other, out, bits=16)
    # one llama.cpp has no graph for: refused with the reason
    other.spec = dataclasses.replace(src.spec, model_type="phi3small")
    with pytest.raises(NotImplementedError, match="llama.cpp has no Phi-3-small graph"):
        export(other, out, bits=16)
    # options checked before any work
    with pytest.raises(ValueError, match="q4_0"):
        export(src, out, bits=8, quant="q4_0")
    with pytest.raises(ValueError, match="unknown option"):
        export(src, out, bits=16, colour="blue")
    # a missing tensor
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "missing"
    shutil.copytree(ckpt, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.fc2.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.fc2\.weight"):
        Source.open(broken)
    # a truncated shard: the error names the file
    cut = tmp_path / "truncated"
    shutil.copytree(ckpt, cut)
    f = cut / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=str(f)):
        Source.open(cut)


def test_unavailable_reasons():
    have = frozenset({"llama_cpp"})
    assert LlamaCppBackend.unavailable_reason(Probe(modules=have), "cpu") is None
    assert "not installed" in LlamaCppBackend.unavailable_reason(Probe(), "cpu")
    assert "Apple silicon" in LlamaCppBackend.unavailable_reason(Probe(modules=have), "metal")
    mac = Probe(system="Darwin", machine="arm64", modules=have, llama_gpu_offload=True)
    assert LlamaCppBackend.unavailable_reason(mac, "metal") is None
    assert "NVIDIA" in LlamaCppBackend.unavailable_reason(Probe(modules=have), "cuda")
    assert "CUDA" in LlamaCppBackend.unavailable_reason(Probe(modules=have, cuda=True), "cuda")
    assert "npu" in LlamaCppBackend.unavailable_reason(Probe(modules=have), "npu")


def test_window_cap_warns(exported, caplog):
    _, spec, path = exported("phi-3-mini-4k")
    with caplog.at_level(logging.WARNING, logger="edgephi.backends.llamacpp"):
        s = open_gguf(path, spec, threads=THREADS, sliding_window="cap")
    assert s.n_ctx == spec.effective_sliding_window
    assert "sliding window" in caplog.text


def test_spm_style_tokenizer_json_without_tokenizer_model(tmp_path):
    """The shipped default model has only a tokenizer.json (SentencePiece-style BPE, no leading-space prefix):
    llama.cpp's own tokenizer on the exported GGUF must give edgephi's ids."""
    import gguf
    import llama_cpp

    from edgephi.default_model import DATA
    from edgephi.benchmarks.quality import heldout_text
    from edgephi.tokenizer import Tokenizer

    res = get("gguf")(Source.open(DATA), tmp_path, bits=16)
    path = tmp_path.parent / res.entry  # entry is relative to out_dir's parent (the bundle root)
    fields = gguf.GGUFReader(str(path)).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert bool(fields["tokenizer.ggml.add_space_prefix"].parts[-1][0]) is False
    text = heldout_text()[:4000]
    ours = Tokenizer.from_dir(DATA).encode(text)
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours
