"""The import rules of the architecture note (README, "Architecture"), and the runtime as an app carries it: every
format runs with the exporters, the benchmark code, torch and transformers unimportable, from a read-only bundle
that it leaves byte-identical."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from readonly import read_only, tree_hash

ROOT = Path(__file__).resolve().parents[1]
# what an app carries: the runtime modules (edgephi/ without the CLI and the package's data)
DATA = ROOT / "edgephi" / "data"  # text the package ships (held-out Python), not code
RUNTIME = sorted(p for p in (ROOT / "edgephi").rglob("*.py") if p.name != "cli.py" and DATA not in p.parents)
NOT_IN_RUNTIME = ("edgephi.export", "edgephi.benchmarks", "torch", "transformers")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "export":
        parts[0] = "edgephi.export"
    elif parts[0] == "benchmarks":
        parts[0] = "edgephi.benchmarks"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports inside functions included), made absolute."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _offenders(files, banned) -> list[str]:
    return [f"{f.relative_to(ROOT)} imports {m}" for f in files for m in sorted(imports(f))
            if any(m == b or m.startswith(b + ".") for b in banned)]


def test_runtime_imports_no_exporter_benchmark_or_training_code():
    assert RUNTIME and not _offenders(RUNTIME, NOT_IN_RUNTIME)


def test_exporters_never_import_backends_and_contracts_import_neither():
    assert not _offenders(sorted((ROOT / "export").rglob("*.py")), ("edgephi.backends",))
    contracts = sorted((ROOT / "edgephi" / "formats").glob("*.py")) + sorted((ROOT / "edgephi" / "arch").glob("*.py"))
    assert not _offenders(contracts, ("edgephi.backends", "edgephi.export", "edgephi.benchmarks"))


def test_the_import_scanner_sees_relative_and_lazy_imports(tmp_path):
    """The rules above would pass vacuously if the scanner missed imports: show it finds both kinds."""
    found = imports(ROOT / "edgephi" / "backends" / "onnx.py")
    assert {"edgephi.formats.onnx", "edgephi.backends.base", "onnxruntime"} <= found
    assert "edgephi.export.bundle" in imports(ROOT / "edgephi" / "cli.py")


def test_no_source_file_over_400_lines():
    files = [p for d in ("edgephi", "export", "benchmarks") for p in (ROOT / d).rglob("*.py") if DATA not in p.parents]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not long


# ---- the runtime alone, on a read-only bundle ------------------------------------------------------------------
RUN = r"""
import dataclasses, importlib.abc, json, sys

BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: an app carries only the runtime)",
                                      name=name)

sys.meta_path.insert(0, Block())
import edgephi
from edgephi.devices import probe

out = {{}}
for fmt, options in {formats!r}.items():
    if options.get("allow_emulated"):  # this machine's x86 HTP emulation stands in for the NPU
        options["probe"] = dataclasses.replace(probe(), qnn_htp="hardware")
    model = edgephi.load({bundle!r}, format=fmt, **options)
    text = model.generate("def f(x):", max_tokens=6, ignore_eos=True)
    answer = "".join(r.text for r in model.chat("Hello", max_tokens=6))
    out[fmt] = {{"backend": model.backend, "generated": text, "chat": answer, "cached": model.session.n_past}}
    model.close()
out["loaded"] = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    from edgephi.devices import probe
    from edgephi.export.bundle import exportable_formats, export_bundle

    formats = list(exportable_formats())
    if probe().qnn_htp is not None:
        formats.append("onnx-npu")
    out, manifest = export_bundle(str(tiny_checkpoint("phi-3-mini-4k")), tmp_path_factory.mktemp("ro") / "bundle",
                                  formats=formats, bits=4,
                                  options={"onnx-npu": {"n_ctx": 64, "chunk": 16, "compile": False}})
    return out, manifest


def test_every_format_runs_without_exporters_from_a_read_only_bundle(bundle, tmp_path):
    from edgephi.devices import probe

    path, manifest = bundle
    runnable = {"onnx": {"device": "cpu"}, "gguf": {"device": "cpu"}}
    if "onnx-npu" in manifest.formats:  # Qualcomm's HTP as the x86 emulation (no NPU here)
        runnable["onnx-npu"] = {"device": "npu", "allow_emulated": True}
    if "coreml" in manifest.formats and probe().system != "Darwin":
        pass  # Core ML predicts only on macOS: its saved program is checked by tests/test_coreml.py instead
    formats = {f: o for f, o in runnable.items() if f in manifest.formats}
    assert {"onnx", "gguf"} <= set(formats)
    before = tree_hash(path)
    env = {"EDGEPHI_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    code = RUN.format(blocked=NOT_IN_RUNTIME, formats=formats, bundle=str(path))
    with read_only(path):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("loaded") == []
    assert set(result) == set(formats)
    for fmt, r in result.items():
        assert r["cached"] > 0 and isinstance(r["generated"], str), (fmt, r)
    assert tree_hash(path) == before
    assert any((tmp_path / "home" / "onnx").rglob("*.opt.onnx"))  # the optimized graph went to the user cache
