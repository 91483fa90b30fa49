"""edgephi bench on a tiny bundle: JSONL rows, markdown table and PNG chart are written (speed is never asserted)."""
from __future__ import annotations

import json

import pytest

from edgephi.benchmarks.bench import add_arguments, run_bench


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
    argv = [str(tiny_bundle), "--prompt", "16", "--gen", "4", "--runs", "2", "--threads", "1", "--peers",
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
            assert r[key]["n"] == 2 and r[key]["median"] > 0  # one per interleaved round
        assert r["peak_rss_mb"] > 0 and r["load_s"] > 0 and r["size_bytes"] > 0
        assert r["bytes_per_token"] and 0 < r["bytes_per_token"] < r["size_bytes"]
        assert r["machine"]["cpu"] and r["commit"] is not None and "bench" in r["command"]
        assert r["bandwidth"]["sum_gbps"] > 0 and r["versions"]["numpy"]
        kernel = r["int4_kernel"]  # onnxruntime's MatMulNBits alone, on this model's layer shapes
        assert kernel["gbps"] > 0 and kernel["weights_gb"] >= 0.02 and kernel["layers"] >= 1, kernel
    summary = [r for r in rows if r["type"] == "summary"]
    assert len(summary) == 1 and "decode_tps" in summary[0]
    md = (out / f"{stem}.md").read_text()
    assert "| subject |" in md and "edgephi" in md and "× best peer decode" in md
    assert "int4 MatMulNBits alone" in md and "% of the numpy-sum read rate" in md
    png = out / f"{stem}.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_bundle_and_shape_together(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        run_bench(_args([str(tmp_path), "--shape", "phi-3-mini", "--out", str(tmp_path)]))


def test_shape_without_tokenizer_says_what_to_pass(tmp_path, monkeypatch):
    from edgephi.benchmarks import bench_shapes
    from edgephi.benchmarks.bench_shapes import shape_checkpoint

    monkeypatch.setenv("EDGEPHI_HOME", str(tmp_path))
    monkeypatch.setattr(bench_shapes, "_shared_maker", lambda: None)  # benchmarks/shapes.py would write one
    with pytest.raises(NotImplementedError, match="--tokenizer"):
        shape_checkpoint("phi-4-mini")


def test_rounds_interleave_subjects_in_rotated_order(tiny_bundle, tmp_path, monkeypatch):
    """--runs N: N rounds, each running every subject once (trial r) in an order that starts one subject later."""
    from edgephi.benchmarks import bench

    calls = []

    def fake_worker(subject, args, prompts, threads, vocab, load_only=False, trial=0):
        if load_only:
            return {}
        calls.append((subject["label"], trial))
        x = 10.0 + trial  # a different figure per round, so the medians below check the merge
        return {"load_s": 1.0 + trial, "peak_rss_mb": 100.0 * (trial + 1), "rss_after_load_mb": 50.0,
                "backend": subject["runner"], "results": {str(p): {"ttft_s": [1.0 / x], "prefill_tps": [p * x],
                                                                   "decode_tps": [x], "generated": [4]}
                                                          for p in prompts}}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    monkeypatch.setattr(bench, "measure_bandwidth", lambda gb, t: {"array_gb": gb, "threads": t, "sum_gbps": 10.0,
                                                                   "copy_gbps": 20.0})
    monkeypatch.setattr(bench, "measure_int4_kernel", lambda spec, t, gb: {"error": "skipped in this test"})
    monkeypatch.setattr(bench, "_other_load", lambda: 0.0)
    monkeypatch.setattr(bench, "_read_through", lambda path: None)
    argv = [str(tiny_bundle), "--prompt", "16", "--gen", "4", "--runs", "3", "--peers", "--no-peer-convert",
            "--out", str(tmp_path)]
    res = run_bench(_args(argv), argv=["edgephi", "bench"] + argv)
    labels = list(dict.fromkeys(label for label, _ in calls))
    n = len(labels)
    assert n >= 2 and len(calls) == 3 * n
    for r in range(3):
        assert calls[r * n:(r + 1) * n] == [(labels[(r + i) % n], r) for i in range(n)]
    rows = [json.loads(line) for line in (tmp_path / f"{res['stem']}.jsonl").read_text().splitlines()]
    for row in (r for r in rows if r["type"] == "result"):
        assert row["decode_tps"]["median"] == 11.0 and row["decode_tps"]["min"] == 10.0 and row["decode_tps"]["n"] == 3
        assert row["peak_rss_mb"] == 300.0 and row["load_s"] == 2.0
