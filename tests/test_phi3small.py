"""Phi-3-small (model_type "phi3small"): edgephi/arch/phi3small.py against a numpy reference written from the
published remote code (tests/phi3small_reference.py; transformers has no class for it).

Two tiny random checkpoints in the release's layout and key names (safetensors written by
edgephi.weights.save_safetensors, the real cl100k_base vocabulary of 100352 ids so that the dummy ids are
masked as the release masks them): heterogeneous heads with a head_sliding_step of 2 and dense layers 1 and 3
(dense_attention_every_n_layers 2), and homogeneous heads with dense layer 2 only (n = 3, where mlx-lm's rule
would differ).  Blocks of 16 tokens, 2 local blocks; the prompt (120) and the decode (to 136) cross 8 blocks, so
local, vertical and dense attention all count.  The numpy lowering, the ONNX export (onnxruntime, cached decode
in the shared KV buffer; onnxruntime-genai on the folder as written) and the Core ML program (read back and run
by tests/coreml_eval.py) are checked against the reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import phi3small_reference as ref
import tiny
from edgephi import arch
from edgephi.export.lower_numpy import NumpyModel
from edgephi.export.source import Source
from edgephi.spec import PhiSpec

tv = pytest.importorskip("tiktoken_vocab")
pytest.importorskip("bpe_openai", reason="bpe-openai (dev extra) ships cl100k_base's ranks")

PROMPT, STEPS = 120, 16
TIE = 0.005  # as tests/test_coreml.py
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              ff_intermediate_size=128, ff_dim_multiplier=None, gegelu_pad_to_256=True, hidden_act="gegelu",
              gegelu_limit=1.0, layer_norm_epsilon=1e-5, max_position_embeddings=256, blocksparse_block_size=16,
              blocksparse_triton_kernel_block_size=16, blocksparse_num_local_blocks=2, mup_attn_multiplier=1.0,
              mup_embedding_multiplier=10.0, mup_use_scaling=True, mup_width_multiplier=8.0, attention_bias=False, torch_dtype="float32", model_type="phi3small",
              architectures=["Phi3SmallForCausalLM"])
KINDS = {  # hetero: vert_stride 8 over 4 heads = head_sliding_step 2, the release's vocabulary (and tokenizer)
    # with its dummy ids; homo: every 3rd block for all heads, a small vocabulary (nothing to mask)
    "hetero": dict(vocab_size=100352, bos_token_id=100257, eos_token_id=100257, num_hidden_layers=4, blocksparse_vert_stride=8, blocksparse_homo_head_pattern=False,
                   dense_attention_every_n_layers=2, rope_embedding_base=1000000, rope_position_scale=1.0),
    "homo": dict(vocab_size=4096, bos_token_id=4000, eos_token_id=4000, num_hidden_layers=3, blocksparse_vert_stride=3, blocksparse_homo_head_pattern=True,
                 dense_attention_every_n_layers=3, rope_embedding_base=10000, rope_position_scale=0.75),
}
DUMMY = ref.dummy_token_indices({t: i for i, t in tv.ADDED["phi3small"]().items()})


def dummy_ids(vocab: int) -> list[int]:
    return DUMMY if vocab == 100352 else []


def rel_err(a, b) -> float:
    """Largest difference over the largest |logit|, the masked ids (equal, float32's lowest) left out."""
    keep = np.ones(a.shape[-1], bool)
    keep[dummy_ids(a.shape[-1])] = False
    return float(np.abs(a[..., keep] - b[..., keep]).max() / np.abs(b[..., keep]).max())


def _weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    spec = PhiSpec.from_hf_config(cfg)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in spec.tensor_shapes().items():
        if name.endswith("layernorm.weight"):
            out[name] = 1 + 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            out[name] = 0.1 * rng.standard_normal(shape)
        else:
            out[name] = (0.02 if "embed" in name else 0.15) * rng.standard_normal(shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """model(kind) -> (checkpoint dir, config, weights)."""
    from edgephi.weights import save_safetensors

    made = {}

    def get(kind: str):
        if kind not in made:
            cfg = {**COMMON, **KINDS[kind]}
            W = _weights(cfg, seed=list(KINDS).index(kind))
            out = tmp_path_factory.mktemp("phi3small") / f"Phi-3-small-{kind}"
            out.mkdir()
            (out / "config.json").write_text(json.dumps(cfg, indent=2))
            save_safetensors(out / "model.safetensors", {k: v.shape for k, v in W.items()}, W.__getitem__)
            if cfg["vocab_size"] == 100352:
                tv.write_tokenizer(out, "phi3small")
            made[kind] = (out, cfg, W)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def expected(model):
    """expected(kind) -> (prompt, tokens, prompt logits, step logits) from the reference."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            _, cfg, W = model(kind)
            prompt = tiny.random_prompt(PROMPT, min(cfg["vocab_size"], 100256), seed=7)
            cache[kind] = (prompt, *ref.greedy(cfg, W, dummy_ids(cfg["vocab_size"]), prompt, STEPS))
        return cache[kind]

    return get


def run(session, prompt: list[int], tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Prompt in one call (all logits), then the reference's tokens one by one through the cache."""
    full = session.forward(prompt, all_logits=True)
    steps = [full[-1]] + [session.forward([t]) for t in tokens[:-1]]
    return full, np.stack(steps)


def check(full, steps, want_full, want_steps, tol: float, fill=arch.MASKED_LOGIT) -> tuple[float, float]:
    """Logits within tol of the largest; the same greedy token at every step (at 16 bits: every step whose
    reference top-2 gap is over TIE of the largest logit: a random model has near ties); the masked ids."""
    errs = rel_err(full, want_full), rel_err(steps, want_steps)
    assert max(errs) <= tol, errs
    for i, (got, want) in enumerate(zip(steps, want_steps)):
        top2 = np.sort(want)[-2:]
        if tol < 1e-2 or top2[1] - top2[0] > TIE * np.abs(want[want > fill]).max():
            assert int(np.argmax(got)) == int(np.argmax(want)), f"step {i}"
    ids = dummy_ids(full.shape[-1])
    assert (steps[:, ids] == fill).all() and (full[:, ids] == fill).all()
    return errs


# ---- the published config --------------------------------------------------------------------------------------
def test_published_config_parses():
    spec = PhiSpec.from_hf_config(Path(__file__).parent / "data" / "configs" / "Phi-3-small-8k-instruct.json")
    assert spec.model_type == "phi3small" and spec.intermediate_size == 14336 and spec.tie_word_embeddings
    assert (spec.rope_theta, spec.norm_eps, spec.head_dim, spec.n_rep) == (1e6, 1e-5, 128, 4)
    assert (spec.blocksparse_block_size, spec.blocksparse_num_local_blocks, spec.blocksparse_vert_stride) == (
        64, 16, 8)
    assert spec.mup_embedding_multiplier == 10.0 and spec.mup_width_multiplier == 8.0 and spec.gegelu_limit == 20.0
    assert list(spec.dummy_token_ids) == DUMMY  # the tokenizer's dummy tokens, as the release derives them
    assert round(spec.n_params / 1e9, 2) == 7.39  # "7B"; tied: no lm_head.weight
    from edgephi.arch import phi3small

    assert [i for i in range(32) if phi3small.is_dense(spec, i)] == list(range(1, 32, 2))
    assert PhiSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # the manifest's round trip


def test_longrope_is_the_originals():
    """Phi-3-small-128k's LongRoPE as positional_embedding.py computes it (no published 128k config.json was found:
    these factors are made up): cos and sin times short_mscale (1.0 when absent) with the short factors,
    long_mscale or sqrt(1 + ln(L / L_orig) / ln(L_orig)) with the long ones; rope_position_scale unused."""
    half = 8
    short, long = [1.0 + k / 10 for k in range(half)], [2.0 + k for k in range(half)]
    cfg = {**COMMON, **KINDS["homo"], "max_position_embeddings": 256, "rope_scaling": {
        "type": "su", "short_factor": short, "long_factor": long, "original_max_position_embeddings": 64}}
    spec = PhiSpec.from_hf_config(cfg)
    for is_long, factors, mscale in ((False, short, 1.0), (True, long, np.sqrt(1 + np.log(4) / np.log(64)))):
        cos, sin = arch.rope_tables(spec, 100, long=is_long)
        inv = 1.0 / (np.array(factors) * 10000.0 ** (np.arange(0, 16, 2) / 16))
        np.testing.assert_allclose(cos, np.cos(np.outer(np.arange(100), inv)) * mscale, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sin, np.sin(np.outer(np.arange(100), inv)) * mscale, rtol=1e-5, atol=1e-6)
    spec = PhiSpec.from_hf_config({**cfg, "rope_scaling": {**cfg["rope_scaling"], "long_mscale": 1.5}})
    assert spec.rope_scaling.long_attention_factor == 1.5 and spec.rope_scaling.attention_factor == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_block_pattern_is_the_originals(kind):
    """arch.BlockSparse against _get_sparse_attn_mask (reference), over 12 blocks."""
    from edgephi.arch import phi3small

    cfg = {**COMMON, **KINDS[kind]}
    bs = phi3small.block_sparse(PhiSpec.from_hf_config(cfg))
    n = 12 * 16
    table = bs.block_table(4, 12)
    pos = np.arange(n) // 16
    ours = table[:, pos][:, :, pos] & np.tril(np.ones((n, n), bool))
    assert np.array_equal(np.broadcast_to(ours, (4, n, n)), ref.sparse_mask(cfg, n, n))
    assert bs.head_step == (0 if kind == "homo" else 2)


def test_checkpoint_rows_are_read_as_the_ops_take_them(model):
    """query_key_value's per-KV-head groups come out q | k | v; up_proj's interleaved halves gelu | linear."""
    ckpt, cfg, W = model("hetero")
    src = Source.open(ckpt)
    stored = W["model.layers.0.self_attn.query_key_value.weight"].reshape(2, 4, 16, 64)  # (kv, rep + 2, hd, H)
    got = src.tensors.read("model.layers.0.self_attn.query_key_value.weight")
    want = np.concatenate([stored[:, :2].reshape(-1, 64), stored[:, 2].reshape(-1, 64), stored[:, 3].reshape(-1, 64)])
    assert np.array_equal(got, want)
    up = W["model.layers.1.mlp.up_proj.bias"]
    assert np.array_equal(src.tensors.read("model.layers.1.mlp.up_proj.bias"), np.concatenate([up[::2], up[1::2]]))
    assert np.array_equal(src.tensors.read_rows("model.layers.1.mlp.up_proj.weight", 120, 136),
                          src.tensors.read("model.layers.1.mlp.up_proj.weight")[120:136])


# ---- numpy and ONNX ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_numpy_lowering_matches_the_reference(kind, model, expected):
    prompt, tokens, want_full, want_steps = expected(kind)
    src = Source.open(model(kind)[0])
    errs = check(*run(NumpyModel(src.tensors, src.spec), prompt, tokens), want_full, want_steps, 1e-4)
    print(f"numpy lowering, {kind}: prefill {errs[0]:.1e}, decode {errs[1]:.1e} of the largest logit")


@pytest.fixture(scope="module")
def onnx_folder(model, tmp_path_factory):
    from edgephi.export.onnx import export

    cache = {}

    def get(kind: str, bits: int) -> Path:
        if (kind, bits) not in cache:
            out = tmp_path_factory.mktemp(f"onnx-{kind}-{bits}") / "onnx"
            export(Source.open(model(kind)[0]), out, bits=bits)
            cache[kind, bits] = out
        return cache[kind, bits]

    return get


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits,tol", [(32, 1e-3), (16, 2e-2)])
def test_onnx_matches_the_reference(kind, bits, tol, onnx_folder, expected):
    """Prefill and cached decode in the backend's one preallocated cache (past = present), against the
    reference; the block-sparse layers' GroupQueryAttention carries the pattern as its attention_bias."""
    import onnx

    from edgephi.backends.onnx import OnnxSession

    folder = onnx_folder(kind, bits)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    sparse = [n for n in gqa if len(n.input) == 11 and n.input[10]]
    assert len(sparse) == {"hetero": 2, "homo": 2}[kind] and len(gqa) == KINDS[kind]["num_hidden_layers"]
    assert not {n.op_type for n in graph.node} & {"SparseAttention"}
    prompt, tokens, want_full, want_steps = expected(kind)
    errs = check(*run(OnnxSession(folder, n_ctx=160, threads=1), prompt, tokens), want_full, want_steps, tol)
    print(f"onnx {bits}-bit, {kind}: prefill {errs[0]:.1e}, decode {errs[1]:.1e} of the largest logit")


def test_onnxruntime_genai_runs_the_folder_as_written(onnx_folder, expected):
    """onnxruntime-genai 0.18 on the exported folder, untouched: the reference's greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    prompt, tokens, *_ = expected("hetero")
    m = og.Model(str(onnx_folder("hetero", 32)))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=PROMPT + STEPS, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got == tokens


def test_bundle_runs_through_the_runtime(model, expected, tmp_path, caplog):
    """export_bundle leaves out GGUF with the reason; edgephi.load runs the ONNX bundle (manifest spec with the
    new fields, the tokenizer, the sampler on masked logits): the reference's greedy tokens."""
    import edgephi
    from edgephi.export.bundle import _formats_for

    ckpt = model("hetero")[0]
    assert _formats_for(Source.open(ckpt).spec, ["onnx", "gguf", "coreml"], explicit=False) == ["onnx", "coreml"]
    assert "leaving out gguf: llama.cpp has no Phi-3-small graph" in caplog.text
    from edgephi.export.bundle import export_bundle

    out, manifest = export_bundle(str(ckpt), tmp_path / "bundle", formats=("onnx",), bits=32)
    assert manifest.spec.blocksparse_vert_stride == 8 and list(manifest.spec.dummy_token_ids) == DUMMY
    prompt, tokens, *_ = expected("hetero")
    m = edgephi.load(out, format="onnx", device="cpu", n_ctx=160)
    got = [r.token for r in m.stream(prompt, max_tokens=STEPS, ignore_eos=True) if r.token is not None]
    m.close()
    assert got == tokens


# ---- Core ML -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_coreml_program_matches_the_reference(kind, model, expected, tmp_path):
    """The saved fp16 package read back and run by tests/coreml_eval.py (Core ML itself needs macOS 15): the
    block-sparse layers' additive masks (per KV-head group for heterogeneous heads) built from the position."""
    pytest.importorskip("coremltools")
    from coreml_eval import Evaluator

    from edgephi.export import coreml as cm

    src = Source.open(model(kind)[0])
    cm.export(src, tmp_path, bits=16, n_ctx=160)
    ev = Evaluator(tmp_path / cm.fmt.PACKAGE)
    prompt, tokens, want_full, want_steps = expected(kind)

    class Session:  # the package's interface as a Session: input_ids and the position of the first
        n_past = 0

        def forward(self, ids, all_logits=False):
            out = ev.predict({"input_ids": np.array([ids], np.int32),
                              "position": np.array([self.n_past], np.int32)})["logits"][0]
            self.n_past += len(ids)
            return out if all_logits else out[-1]

    errs = check(*run(Session(), prompt, tokens), want_full, want_steps, 2e-2, fill=np.finfo(np.float16).min)
    print(f"coreml fp16, {kind}: prefill {errs[0]:.1e}, decode {errs[1]:.1e} of the largest logit")


# ---- the formats that cannot hold it ------------------------------------------------------------------------------
def test_gguf_and_npu_refuse_with_the_reason(model, tmp_path):
    from edgephi.export.bundle import export_bundle
    from edgephi.export.registry import refusal

    spec = Source.open(model("homo")[0]).spec
    assert "llama.cpp has no Phi-3-small graph" in refusal("gguf", spec)
    assert "attention(block_sparse)" in refusal("onnx-npu", spec)
    assert refusal("onnx", spec) is None
    with pytest.raises(NotImplementedError, match="llama.cpp has no Phi-3-small graph"):
        export_bundle(str(model("homo")[0]), tmp_path / "gguf", formats=("gguf",), bits=4)
    assert not (tmp_path / "gguf").exists()


def test_tokenizer_is_cl100k_with_the_releases_special_tokens(model):
    import bpe_openai

    from edgephi.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model("hetero")[0])
    text = "def f(x):\n    return x  # 🦙 I've 12345 ǅungla"
    assert tok.encode(text) == bpe_openai.get_encoding("cl100k_base").encode(text)
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")] == [
        100257, 100261, 100262, 100263, 100266]
    src = Source.open(model("hetero")[0])
    assert src.bos_id == 100257 and {100257, 100266} <= set(src.stop_ids)
