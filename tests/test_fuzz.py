"""Fuzzing the readers of untrusted files: the safetensors header, config.json, manifest.json and a GGUF header.

The property, for every input: the reader returns, or raises one of the documented types (ValueError and its
subclasses CheckpointError and BundleError, FileNotFoundError, NotImplementedError) with a one-line message;
never another exception, never a hang (each input gets HANG_SECONDS).

In the test suite each target runs EDGEPHI_FUZZ_EXAMPLES inputs (default 200, a fixed seed: the suite stays
reproducible; a few seconds in all) made by hypothesis from seed files: structured mutations (a JSON field replaced
by any JSON value, deleted or added; a GGUF count or length set to an extreme) and byte mutations (flips,
interesting integers, insertions, truncation).  Longer runs:

    EDGEPHI_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py  # random seed

    # coverage-guided, with atheris (pip install atheris): TARGET is safetensors, config, manifest or gguf; the
    # seeds are written to the corpus folder first; libFuzzer's flags follow
    .venv/bin/python tests/test_fuzz.py gguf /tmp/fuzz-gguf -max_total_time=600 -timeout=10

A crash it finds becomes a case in FOUND below (or in tests/test_bad_inputs.py) before it is fixed.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import signal
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis") if __name__ != "__main__" else None
if hypothesis is not None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.configuration import set_hypothesis_home_dir

_instrumented = contextlib.ExitStack()
if __name__ == "__main__":  # the coverage-guided run: atheris instruments edgephi's code as it is imported
    import atheris

    _instrumented.enter_context(atheris.instrument_imports(include=["edgephi"]))
with _instrumented:
    from edgephi.formats.gguf import read_header as read_gguf_header
    from edgephi.manifest import FormatEntry, Manifest, sha256_path
    from edgephi.spec import PhiSpec
    from edgephi.weights import read_header as read_safetensors_header, save_safetensors

ALLOWED = (ValueError, FileNotFoundError, NotImplementedError)
HANG_SECONDS = 10
EXAMPLES = int(os.environ.get("EDGEPHI_FUZZ_EXAMPLES", "200"))
TESTS = Path(__file__).resolve().parent
REAL_GGUF = TESTS.parent.parent / "shared" / "vocab" / "ggml-vocab-phi-3.gguf"  # llama.cpp's vocab-only test file
_work: list[Path] = []


def work() -> Path:
    """One scratch folder per process (hypothesis runs many inputs per test; a tmp_path fixture would be reused)."""
    if not _work:
        _work.append(Path(tempfile.mkdtemp(prefix="edgephi-fuzz-")))
        atexit.register(shutil.rmtree, _work[0], True)
    return _work[0]


# ---- seeds ------------------------------------------------------------------------------------------------------
BASE = dict(model_type="phi3", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=[2, 3], pad_token_id=2, tie_word_embeddings=False, sliding_window=32)
LONGROPE = {**BASE, "max_position_embeddings": 256, "original_max_position_embeddings": 64,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
PHI2 = dict(model_type="phi", vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, partial_rotary_factor=0.5, layer_norm_eps=1e-5,
            hidden_act="gelu_new", rope_theta=10000.0)
CONFIG_SEEDS = [BASE, LONGROPE, PHI2] + [json.loads(p.read_text()) for p in sorted((TESTS / "data" / "configs").glob("*.json"))]


def safetensors_seed() -> bytes:
    path = work() / "seed.safetensors"
    shapes = {"a": (2, 3), "b": (4,), "c": (0, 2)}
    save_safetensors(path, shapes, lambda n: np.arange(math.prod(shapes[n])).reshape(shapes[n]), dtype="BF16")
    return path.read_bytes()


_GGUF_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(vtype: int, value) -> bytes:
    if vtype == 8:
        return _gguf_str(value)
    if vtype == 9:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_gguf_value(etype, v) for v in items)
    return struct.pack(_GGUF_FMT[vtype], value)


def gguf_bytes(kvs: list[tuple[str, int, object]], version: int = 3) -> bytes:
    """A GGUF file (one 4-float tensor) from typed key/value pairs: what the reader is tested and fuzzed on."""
    out = b"GGUF" + struct.pack("<IQQ", version, 1, len(kvs))
    out += b"".join(_gguf_str(k) + struct.pack("<I", t) + _gguf_value(t, v) for k, t, v in kvs)
    out += _gguf_str("x") + struct.pack("<IQIQ", 1, 4, 0, 0)  # name, n_dims, dims, type F32, offset
    out += b"\0" * (-len(out) % 32)
    return out + struct.pack("<4f", 1, 2, 3, 4)


GGUF_KVS = [
    ("general.architecture", 8, "phi3"), ("general.alignment", 4, 32), ("phi3.block_count", 4, 2),
    ("phi3.embedding_length", 4, 64), ("phi3.context_length", 4, 64), ("phi3.rope.freq_base", 6, 10000.0),
    ("general.file_type", 5, 1), ("u8", 0, 255), ("i8", 1, -1), ("u16", 2, 65535), ("i16", 3, -2),
    ("u64", 10, 2**64 - 1), ("i64", 11, -2**63), ("f64", 12, 0.5), ("add_bos", 7, True),
    ("tokenizer.ggml.tokens", 9, (8, ["<unk>", "<s>", "▁the", "é", "\u4e2d", ""])),
    ("tokenizer.ggml.scores", 9, (6, [0.0, -1.5, 2.25])), ("tokenizer.ggml.token_type", 9, (5, [2, 3, 1])),
    ("nested", 9, (9, [(0, [1, 2]), (8, ["a"])])), ("flags", 9, (7, [True, False])),
]


def gguf_seeds() -> list[bytes]:
    seeds = [gguf_bytes(GGUF_KVS), gguf_bytes(GGUF_KVS[:3], version=2)]
    if REAL_GGUF.is_file():  # llama.cpp's own file: its first 4 KiB (the reader meets the cut inside the vocabulary)
        seeds.append(REAL_GGUF.read_bytes()[:4096])
    return seeds


def bundle_dir() -> Path:
    """A small bundle for the manifest target: one model file with its recorded size and sha256."""
    d = work() / "bundle"
    if not d.is_dir():
        (d / "gguf").mkdir(parents=True)
        (d / "gguf" / "m.gguf").write_bytes(b"GGUF" + bytes(60))
        (d / "tokenizer.json").write_text("{}")
    return d


def manifest_seeds() -> list[bytes]:
    d, out = bundle_dir(), []
    for cfg in (BASE, LONGROPE):
        spec = PhiSpec.from_hf_config(cfg, name="seed")
        entry = FormatEntry(format="gguf", entry="gguf/m.gguf", files=["gguf/m.gguf"], bits=16, quant="f16",
                            sizes={"gguf/m.gguf": 64}, sha256={"gguf/m.gguf": sha256_path(d / "gguf" / "m.gguf")},
                            extra={"arch": "phi3"})
        m = Manifest(spec=spec, formats={"gguf": entry}, tokenizer_files=["tokenizer.json"], stop_ids=[2, 3],
                     bos_id=1, context_length=spec.max_position_embeddings, source={"model": "seed"},
                     edgephi_version="0")
        out.append(m.to_json().encode())
    return out


# ---- targets: bytes in, a reader run on them --------------------------------------------------------------------
def target_safetensors(data: bytes) -> None:
    path = work() / "x.safetensors"
    path.write_bytes(data)
    infos = read_safetensors_header(path)
    spans = sorted((t.offset, t.offset + t.nbytes) for t in infos.values() if t.nbytes)
    assert all(e <= len(data) for _, e in spans) and all(b1 >= e0 for (_, e0), (b1, _) in zip(spans, spans[1:]))


def target_config(data: bytes) -> None:
    d = work() / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_bytes(data)
    PhiSpec.from_hf_config(d)


def target_config_dict(cfg) -> None:
    spec = PhiSpec.from_hf_config(cfg)
    spec.tensor_shapes()  # bounded: a spec that parses is safe to build tables from


def target_manifest(data: bytes) -> None:
    d = bundle_dir()
    (d / "manifest.json").write_bytes(data)
    m = Manifest.load(d)
    m.verify(d)


def target_gguf(data: bytes) -> None:
    path = work() / "x.gguf"
    path.write_bytes(data)
    h = read_gguf_header(path)
    assert h["version"] in (2, 3) and isinstance(h["metadata"], dict)


TARGETS = {"safetensors": (target_safetensors, lambda: [safetensors_seed()]),
           "config": (target_config, lambda: [json.dumps(c).encode() for c in CONFIG_SEEDS]),
           "manifest": (target_manifest, manifest_seeds), "gguf": (target_gguf, gguf_seeds)}


@contextmanager
def no_hang(seconds: int):
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hang(signum, frame):
        raise TimeoutError(f"input took over {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check(target, data) -> None:
    """The property: returns, or raises a documented type with a one-line message."""
    with no_hang(HANG_SECONDS):
        try:
            target(data)
        except ALLOWED as e:
            assert str(e) and "\n" not in str(e), f"message is not one line: {e!r:.300}"


# ---- crashes the fuzzer found, kept as cases (each was a traceback before its fix) --------------------------------
def _st(header) -> bytes:
    """A safetensors file with this header and 64 bytes of data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(64)


def _manifest_with(change) -> bytes:
    doc = json.loads(manifest_seeds()[0])
    change(doc)
    return json.dumps(doc).encode()


_T = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
FOUND = [
    ("safetensors", _st({"a": {**_T, "dtype": ["F32"]}})),  # TypeError: unhashable
    ("safetensors", _st({"a": {**_T, "data_offsets": ["0", "4"]}})),  # TypeError: str - str
    ("safetensors", struct.pack("<Q", 20002) + b"[" * 10001 + b"]" * 10001),  # RecursionError in json
    ("config", b"[" * 100000),  # RecursionError in json
    ("config", json.dumps({**BASE, "model_type": ["phi3"]}).encode()),  # TypeError: unhashable
    ("config", json.dumps({**LONGROPE, "max_position_embeddings": 10**400}).encode()),  # OverflowError: int / int
    ("config", json.dumps({**BASE, "rope_theta": 10**400}).encode()),  # OverflowError in float()
    ("config", json.dumps({**LONGROPE, "rope_scaling": {**LONGROPE["rope_scaling"], "factor": "4"}}).encode()),
    ("manifest", _manifest_with(lambda m: m.__setitem__("formats", []))),  # AttributeError
    ("manifest", _manifest_with(lambda m: m.__setitem__("context_length", 1e400))),  # OverflowError: int(inf)
    ("manifest", _manifest_with(lambda m: m["spec"].__setitem__("\n", None))),  # a two-line message (hypothesis)
    ("gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_str("k") + struct.pack("<IIQ", 9, 9, 2**40)),
]


@pytest.mark.parametrize("name, data", FOUND, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FOUND)])
def test_found_inputs_are_clean_errors(name, data):
    check(TARGETS[name][0], data)


def test_seeds_parse():
    for name, (target, seeds) in TARGETS.items():
        for i, data in enumerate(seeds()):
            if name == "gguf" and i == 2:  # the real file cut inside its vocabulary
                with pytest.raises(ValueError, match="'tokenizer.ggml.tokens'.* does not fit"):
                    target(data)
            else:
                target(data)  # no exception: the mutations start from valid files


def test_the_gguf_reader_agrees_with_gguf_py():
    gguf = pytest.importorskip("gguf")
    if not REAL_GGUF.is_file():
        pytest.skip(f"{REAL_GGUF} not here")
    for path in (REAL_GGUF, None):
        if path is None:
            path = work() / "seed.gguf"
            path.write_bytes(gguf_seeds()[0])
        ours = read_gguf_header(path)["metadata"]
        theirs = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
                  if not k.startswith("GGUF.") and k != "nested"}  # gguf-py does not read arrays of arrays
        assert ours.pop("nested", [[1, 2], ["a"]]) == [[1, 2], ["a"]]
        assert ours.keys() == theirs.keys()
        for k, v in theirs.items():
            assert ours[k] == pytest.approx(v) if isinstance(v, float) else ours[k] == v, k


# ---- hypothesis: mutations of the seeds ---------------------------------------------------------------------------
if hypothesis is not None:
    INTERESTING = [0, 1, 2, 7, 8, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1,
                   2**63, 2**64 - 1]
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 10**400])
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
        max_leaves=10)

    def _paths(doc, prefix=()):
        yield prefix
        if isinstance(doc, dict):
            for k, v in doc.items():
                yield from _paths(v, prefix + (k,))
        elif isinstance(doc, list):
            for i, v in enumerate(doc[:8]):
                yield from _paths(v, prefix + (i,))

    @st.composite
    def mutated_json(draw, seeds):
        """A seed document with 1-3 fields replaced by any JSON value, deleted, or a key added."""
        doc = json.loads(json.dumps(draw(st.sampled_from(seeds))))
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(list(_paths(doc))))
            value = draw(json_values)
            if not path:
                doc = value if draw(st.integers(0, 9)) == 0 else doc
                continue
            parent = doc
            for k in path[:-1]:
                parent = parent[k]
            kind = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            if kind == "delete":
                del parent[path[-1]]
            elif kind == "add" and isinstance(parent, dict):
                parent[draw(st.text(max_size=12))] = value
            else:
                parent[path[-1]] = value
            if not isinstance(doc, (dict, list)):
                break
        return doc

    @st.composite
    def mutated_bytes(draw, seeds):
        """A seed with 0-4 byte-level edits: flips, interesting integers (as 4 or 8 bytes), insertions, cuts."""
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 4))):
            near_start = draw(st.booleans())
            pos = draw(st.integers(0, max(0, min(len(data), 256 if near_start else len(data)) - 1)))
            kind = draw(st.sampled_from(["flip", "int", "int", "insert", "delete", "truncate"]))
            if kind == "flip" and data:
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif kind == "int":
                width = draw(st.sampled_from([4, 8]))
                data[pos:pos + width] = (draw(st.sampled_from(INTERESTING)) % 2 ** (8 * width)).to_bytes(width, "little")
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            elif kind == "delete":
                del data[pos:pos + draw(st.integers(1, 16))]
            else:
                del data[pos:]
        return bytes(data)

    def _json_bytes(doc) -> bytes:
        return json.dumps(doc).encode()

    # hypothesis caches what it collects from the source (seconds to rebuild) outside the working tree
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "edgephi-hypothesis")

    def fuzz_settings():
        return settings(max_examples=EXAMPLES, deadline=None, database=None,
                        derandomize="EDGEPHI_FUZZ_EXAMPLES" not in os.environ,
                        suppress_health_check=list(HealthCheck))

    _ST_SEED = [safetensors_seed()]
    _ST_HEADER = json.loads(_ST_SEED[0][8:8 + struct.unpack("<Q", _ST_SEED[0][:8])[0]])

    @fuzz_settings()
    @given(mutated_bytes(_ST_SEED) | mutated_json([_ST_HEADER]).map(_st))
    def test_fuzz_safetensors_header(data):
        check(target_safetensors, data)

    @fuzz_settings()
    @given(mutated_json(CONFIG_SEEDS))
    def test_fuzz_config_dict(cfg):
        check(target_config_dict, cfg)

    @fuzz_settings()
    @given(mutated_bytes([_json_bytes(c) for c in CONFIG_SEEDS[:3]]) | mutated_json(CONFIG_SEEDS).map(_json_bytes))
    def test_fuzz_config_file(data):
        check(target_config, data)

    _MANIFESTS = manifest_seeds()

    @fuzz_settings()
    @given(mutated_json([json.loads(m) for m in _MANIFESTS]).map(_json_bytes) | mutated_bytes(_MANIFESTS))
    def test_fuzz_manifest(data):
        check(target_manifest, data)

    @fuzz_settings()
    @given(mutated_bytes(gguf_seeds()))
    def test_fuzz_gguf_header(data):
        check(target_gguf, data)


# ---- atheris: coverage-guided, outside pytest ---------------------------------------------------------------------
def _atheris_main(argv: list[str]) -> None:
    import atheris

    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [CORPUS_DIR] [libFuzzer flags]")
    target, seeds = TARGETS[argv.pop(1)]
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    for d in corpus[:1]:
        Path(d).mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()):
            (Path(d) / f"seed-{i}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except ALLOWED as e:
            if not str(e) or "\n" in str(e):
                raise AssertionError(f"message is not one line: {e!r:.300}") from e

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    _atheris_main(sys.argv)
