"""The GGUF format (bundle/gguf/model-<quant>.gguf): llama.cpp's own file, read by llama.cpp untouched.

Architecture names, metadata keys and tensor names are llama.cpp's (gguf-py's constants); the exporter takes
them from gguf-py and the per-architecture name in edgephi/arch.  Sliding window: the file records it
(<arch>.attention.sliding_window) but llama.cpp 0.3.x disables Phi-3's window, so the llamacpp backend applies it
(edgephi/backends/llamacpp_window.py).  LongRoPE: both factor lists are stored once as rope_factors_long/short.
"""
from __future__ import annotations

import ctypes
import logging

FORMAT = "gguf"
# quant name -> (llama_cpp ftype constant, or None for a float file written directly; bits)
QUANTS: dict[str, tuple[str | None, int]] = {
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 4),
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", 4),
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", 8),
    "f16": (None, 16),
    "bf16": (None, 16),
    "f32": (None, 32),
}
DEFAULT_QUANT = {4: "q4_k_m", 8: "q8_0", 16: "f16"}


def file_name(quant: str) -> str:
    return f"model-{quant}.gguf"


# ---- llama.cpp's log ------------------------------------------------------------------------------------------
# ggml_log_level (ggml.h) -> logging level.  llama.cpp's warnings go to DEBUG: the ones Phi triggers (e.g. "Phi SWA
# is currently disabled") are handled by edgephi, and llama-cpp-python's own mapping predates the numbering.
_GGML_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.ERROR}
_GGML_LOG_CONT = 5  # continues the previous message at its level
_llama_log = logging.getLogger("edgephi.llama.cpp")
_log_state = {"callback": None, "level": logging.DEBUG}


def quiet_llama_logs() -> None:
    """Send llama.cpp's log (stderr by default) to the logger "edgephi.llama.cpp" (errors at ERROR, rest DEBUG).

    Both sides call it before touching llama.cpp: the exporter's quantizer and the llamacpp backend."""
    if _log_state["callback"] is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, _user_data) -> None:
        if level != _GGML_LOG_CONT:
            _log_state["level"] = _GGML_LEVELS.get(level, logging.DEBUG)
        if _llama_log.isEnabledFor(_log_state["level"]):
            _llama_log.log(_log_state["level"], "%s", text.decode("utf-8", "replace").rstrip("\n"))

    _log_state["callback"] = _callback  # keep a reference: llama.cpp holds a raw pointer to it
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
