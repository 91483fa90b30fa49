"""What this machine has, probed once; tests build a Probe by hand to simulate other machines."""
from __future__ import annotations

import functools
import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass, field

OPTIONAL_MODULES = ("llama_cpp", "coremltools", "onnxruntime_genai", "onnxruntime_qnn")


@dataclass(frozen=True)
class Probe:
    system: str = "Linux"  # platform.system(): Linux, Darwin, Windows
    machine: str = "x86_64"  # platform.machine(): x86_64, arm64, aarch64
    macos_version: tuple[int, ...] | None = None
    cpu_count: int = 1
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cuda: bool = False  # an NVIDIA GPU and driver are visible
    llama_gpu_offload: bool = False  # llama.cpp was built with a GPU backend (Metal, CUDA)
    modules: frozenset[str] = field(default_factory=frozenset)  # importable optional modules
    qnn_htp: str | None = None  # "hardware", "emulated" (x86 HTP simulator) or None
    memory_bytes: int | None = None  # the machine's RAM (what the CPU, Apple GPUs and phone NPUs share)

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine == "arm64"

    def has(self, module: str) -> bool:
        return module in self.modules


def _macos_version() -> tuple[int, ...] | None:
    if platform.system() != "Darwin":
        return None
    try:
        return tuple(int(x) for x in platform.mac_ver()[0].split("."))
    except ValueError:
        return None


def _cuda_visible() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def _llama_gpu_offload(modules) -> bool:
    if "llama_cpp" not in modules:
        return False
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except (ImportError, AttributeError, OSError):
        return False


@functools.lru_cache(maxsize=1)
def probe() -> Probe:
    """This machine (cached: probing imports onnxruntime and, if installed, llama_cpp)."""
    modules = frozenset(m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is not None)
    try:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    except ImportError:
        providers = ()
    qnn = None
    if "onnxruntime_qnn" in modules:
        # The PyPI wheel for x86-64 Linux/Windows carries Qualcomm's HTP *simulator*; real NPUs are on Arm SoCs.
        qnn = "emulated" if platform.machine().lower() in ("x86_64", "amd64") else "hardware"
    return Probe(system=platform.system(), machine=platform.machine(), macos_version=_macos_version(),
                 cpu_count=os.cpu_count() or 1, ort_providers=providers, cuda=_cuda_visible(),
                 llama_gpu_offload=_llama_gpu_offload(modules), modules=modules, qnn_htp=qnn,
                 memory_bytes=_memory())


def _memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except (ImportError, OSError):
        return None


def physical_cores() -> int:
    """Threads to use by default: physical cores (hyper-threads slow matmul-bound decode down)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return max(1, n or os.cpu_count() or 1)
