"""NPU backend: the onnx-npu format (edgephi/formats/onnx_npu.py) on Qualcomm's Hexagon HTP through onnxruntime-qnn.

Two static graphs: prefill (chunk tokens) and decode (1 token).  The KV cache lives here, in float16 numpy arrays
(1, n_kv, n_ctx, head_dim) per layer: every run reads the whole cache plus an additive mask (causal, valid length,
sliding window, chunk padding) and returns the new tokens' K/V, which are written at n_past..  A compiled QNN
context binary for the chosen target is preferred; without one the ONNX graph is compiled at load (slow).

onnxruntime-qnn's x86-64 wheel runs the HTP as an emulation on the host CPU: correct, but not an NPU and not
NPU speed.  unavailable_reason() therefore refuses device "npu" there; tests open it with allow_emulated=True.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..devices import Probe
from ..formats import onnx_npu as fmt
from .base import Backend, Session, register_backend

log = logging.getLogger(__name__)

REAL_DEVICE_NEEDS = ("a Snapdragon SoC with a Hexagon HTP (v73 or later: 8 Gen 2/3, 8 Elite, X Elite) and Qualcomm's "
                     "QNN HTP driver (Windows on Snapdragon or arm64 Android/Linux with onnxruntime-qnn)")


def emulation_reason(machine: str) -> str:
    return (f"onnxruntime-qnn here runs Qualcomm's HTP as an x86 emulation on the host CPU ({machine}), not an NPU; "
            f"a real NPU needs {REAL_DEVICE_NEEDS}")


class QnnSession(Session):
    def __init__(self, model_dir: Path, target: str | None = None, prefer_context: bool = True,
                 threads: int | None = None, strict: bool = True, record: bool = False, n_ctx: int | None = None,
                 cpu: bool = False):
        from ..formats.qnn import make_session

        model_dir = Path(model_dir)
        cfg = fmt.NpuConfig.load(model_dir)
        self.graph_ctx, self.chunk = int(cfg.n_ctx), int(cfg.chunk)  # static: fixed at export
        self.n_layers, self.n_kv, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.n_ctx = self.graph_ctx if n_ctx is None else min(int(n_ctx), self.graph_ctx)
        if n_ctx is not None and int(n_ctx) > self.graph_ctx:
            log.info("qnn: n_ctx=%s asked for; the static graphs hold %d (export with a larger n_ctx)", n_ctx,
                     self.graph_ctx)
        self.window = cfg.sliding_window
        self.vocab = cfg.vocab_size
        self.mask_value = np.float16(cfg.mask_value)
        self.long_offset, self.long_after = cfg.rope_long_offset, cfg.rope_long_after
        compiled = cfg.targets
        if target is None:
            target = next(iter(compiled), None) or "sm8650"
        self.target = fmt.get_target(target)
        self.from_context = prefer_context and target in compiled and not cpu
        self.sessions = {}
        for name in fmt.GRAPHS:
            path = model_dir / (compiled[target]["graphs"][name] if self.from_context else cfg.graphs[name]["file"])
            if not path.is_file():
                raise FileNotFoundError(f"{path}: {name} graph named by {fmt.CONFIG} is missing")
            if cpu:  # the same graphs on onnxruntime's CPU provider: the device check's reference
                import onnxruntime as ort

                self.sessions[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            else:
                self.sessions[name] = make_session(path, self.target, strict=strict, record=record, threads=threads)
        log.info("qnn: %s graphs for %s (%s)", "context-binary" if self.from_context else "ONNX", target,
                 self.target.chip)
        shape = (1, self.n_kv, self.graph_ctx, self.head_dim)  # (B, n_kv, graph_ctx, hd)
        self.keys = [np.zeros(shape, np.float16) for _ in range(self.n_layers)]
        self.values = [np.zeros(shape, np.float16) for _ in range(self.n_layers)]
        self.n_past = 0
        self.n_evaluated = 0

    # ---- one static run -----------------------------------------------------------------------------------
    def _mask(self, S: int, t: int) -> np.ndarray:
        """(1, 1, S, n_ctx + S) additive bias for t real tokens at n_past.. (rows t..S-1 are padding)."""
        n, p0 = self.graph_ctx, self.n_past
        q = p0 + np.arange(S)[:, None]  # (S, 1) query positions
        cache_pos = np.arange(n)[None, :]  # (1, n_ctx)
        new_pos = p0 + np.arange(S)[None, :]  # (1, S)
        ok_cache = np.broadcast_to(cache_pos < p0, (S, n))
        ok_new = (new_pos <= q) & (np.arange(S)[None, :] < t)
        if self.window is not None:
            ok_cache = ok_cache & (cache_pos > q - self.window)
            ok_new = ok_new & (new_pos > q - self.window)
        ok = np.concatenate([ok_cache, ok_new], axis=1)
        ok[np.arange(t, S), n + np.arange(t, S)] = True  # a padding row sees itself: no all-masked softmax
        return np.where(ok, np.float16(0), self.mask_value).astype(np.float16)[None, None]

    def _run(self, ids: np.ndarray, long: bool) -> np.ndarray:
        """Evaluate t <= S ids at n_past; writes their K/V into the cache; logits (t, V) float32."""
        t = len(ids)
        graph = "decode" if t == 1 else "prefill"
        S = 1 if t == 1 else self.chunk
        pos = self.n_past + np.arange(S)
        rows = np.minimum(pos, self.graph_ctx - 1) + (self.long_offset if long else 0)
        feed = {"input_ids": np.pad(ids, (0, S - t)).astype(np.int32)[None],
                "position_ids": rows.astype(np.int32)[None], "attention_bias": self._mask(S, t)}
        for i in range(self.n_layers):
            feed[fmt.PAST["key"] % i], feed[fmt.PAST["value"] % i] = self.keys[i], self.values[i]
        outs = self.sessions[graph].run(None, feed)
        names = [o.name for o in self.sessions[graph].get_outputs()]
        res = dict(zip(names, outs))
        end = self.n_past + t
        for i in range(self.n_layers):
            self.keys[i][:, :, self.n_past:end] = res[fmt.PRESENT["key"] % i][:, :, :t]
            self.values[i][:, :, self.n_past:end] = res[fmt.PRESENT["value"] % i][:, :, :t]
        self.n_past = end
        return res[fmt.LOGITS][0, :t].astype(np.float32)

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = self.check_ids(ids, self.vocab)
        t = len(ids)
        self.check_room(t)
        # LongRoPE: the whole call's last position decides short or long (as one unchunked forward would)
        long = self.long_offset is not None and self.n_past + t > self.long_after
        out = []
        for start in range(0, t, self.chunk):
            out.append(self._run(ids[start:start + self.chunk], long))
        self.n_evaluated += t
        logits = np.concatenate(out)
        return logits if all_logits else logits[-1]

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.n_past:
            raise ValueError(f"rewind: n={n}; allowed 0..{self.n_past} (the tokens cached)")
        self.n_past = n  # slots >= n are masked until overwritten

    def placements(self) -> dict[str, dict[str, int]]:
        """{graph: {execution provider: nodes}}; needs record=True at open."""
        from ..formats.qnn import placements

        return {name: placements(s) for name, s in self.sessions.items()}

    def close(self) -> None:
        self.sessions = {}


@register_backend
class QnnBackend(Backend):
    name = "qnn"
    format = fmt.FORMAT
    devices = ("npu",)

    @classmethod
    def unavailable_reason(cls, probe: Probe, device: str) -> str | None:
        if device != "npu":
            return f"the qnn backend drives the npu, not {device}"
        if not probe.has("onnxruntime_qnn"):
            return f"onnxruntime-qnn is not installed (pip install 'edgephi[qnn]'); it also needs {REAL_DEVICE_NEEDS}"
        if probe.qnn_htp == "emulated":
            return emulation_reason(probe.machine)
        if probe.qnn_htp != "hardware":
            return f"no Qualcomm HTP found; needs {REAL_DEVICE_NEEDS}"
        return None

    @classmethod
    def open(cls, bundle_dir: Path, manifest: Any, device: str, **options) -> QnnSession:
        """options: target (a key of edgephi.formats.onnx_npu.TARGETS; default the first compiled one), prefer_context (True: the
        bundle's context binary when there is one for the target), threads, strict (True: no CPU fallback),
        record (False: True keeps node placements for placements()), n_ctx (at most the exported one),
        allow_emulated (False: True opens the x86 HTP emulation, for tests; it is never an NPU), cpu (False: True
        runs the same graphs on onnxruntime's CPU provider, with device "cpu": the reference of the device check)."""
        from ..devices import probe

        known = {"target", "prefer_context", "threads", "strict", "record", "n_ctx", "allow_emulated", "cpu"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"qnn backend: unknown option(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(known))}")
        allow = bool(options.pop("allow_emulated", False))
        if options.get("cpu") and device != "cpu":
            raise ValueError(f"qnn backend: cpu=True runs on device 'cpu', not {device!r}")
        why = None if options.get("cpu") else cls.unavailable_reason(probe(), device if device != "auto" else "npu")
        if why is not None and not (allow and probe().qnn_htp == "emulated"):
            raise ValueError(f"qnn backend: {why}")
        entry = f"{fmt.FORMAT}/{fmt.GRAPHS[0]}.onnx"
        if manifest is not None and getattr(manifest, "formats", None) and fmt.FORMAT in manifest.formats:
            entry = manifest.formats[fmt.FORMAT].entry
        return QnnSession((Path(bundle_dir) / entry).parent, **options)
