"""edgephi bench on a tiny bundle: JSONL rows, markdown table and PNG chart are written (speed is never asserted)."""
from __future__ import annotations

import json

import pytest

from edgephi.bench import add_arguments, run_bench


def _args(argv):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    from edgephi.export.bundle import export_bundle, exportable_formats

    formats = tuple(f for f in ("onnx", "gguf") if f in exportable_formats())
    if not formats:
        pytest.skip("neither the onnx nor the gguf exporter is installed")
    out, _ = export_bundle(str(tiny_checkpoint("phi-3-mini-4k")), tmp_path_factory.mktemp("bench") / "bundle",
                           formats=formats, bits=4)
    return out


def test_bench_writes_rows_table_and_chart(tiny_bundle, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    argv = [str(tiny_bundle), "--prompt", "16", "--gen", "4", "--runs", "1", "--threads", "1", "--peers",
            "--no-peer-convert", "--bandwidth-gb", "0.05", "--out", str(out)]
    res = run_bench(_args(argv), argv=["edgephi", "bench"] + argv)
    stem = res["stem"]
    rows = [json.loads(line) for line in (out / f"{stem}.jsonl").read_text().splitlines()]
    results = [r for r in rows if r["type"] == "result"]
    measured = [r for r in results if r.get("decode_tps")]
    assert any(r["kind"] == "edgephi" for r in measured), [r.get("error") for r in results]
    for r in measured:
        assert r["prompt_tokens"] == 16 and r["gen_tokens"] == 4
        for key in ("ttft_s", "prefill_tps", "decode_tps"):
            assert r[key]["n"] == 1 and r[key]["median"] > 0
        assert r["peak_rss_mb"] > 0 and r["load_s"] > 0 and r["size_bytes"] > 0
        assert r["bytes_per_token"] and 0 < r["bytes_per_token"] < r["size_bytes"]
        assert r["machine"]["cpu"] and r["commit"] is not None and "bench" in r["command"]
        assert r["bandwidth"]["sum_gbps"] > 0 and r["versions"]["numpy"]
    summary = [r for r in rows if r["type"] == "summary"]
    assert len(summary) == 1 and "decode_tps" in summary[0]
    md = (out / f"{stem}.md").read_text()
    assert "| subject |" in md and "edgephi" in md and "× best peer decode" in md
    png = out / f"{stem}.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_bundle_and_shape_together(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        run_bench(_args([str(tmp_path), "--shape", "phi-3-mini", "--out", str(tmp_path)]))


def test_shape_without_tokenizer_says_what_to_pass(tmp_path, monkeypatch):
    from edgephi import bench_shapes
    from edgephi.bench_shapes import shape_checkpoint

    monkeypatch.setenv("EDGEPHI_HOME", str(tmp_path))
    monkeypatch.setattr(bench_shapes, "_shared_maker", lambda: None)  # benchmarks/shapes.py would write one
    with pytest.raises(NotImplementedError, match="--tokenizer"):
        shape_checkpoint("phi-4-mini")
