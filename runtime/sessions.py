"""ONNX Runtime sessions of one artifact, drawing device memory from one arena per device.

By default each session (vision, decoder, LM head, cache rows) keeps its own memory arena, and
what a session's largest run took stays held in its arena: the vision graph's activations could
not be reused by the decoder's prefill, so the measured peak was near the sum of the stages'
peaks (W1 int4: 10.5 GiB against 5.5 estimated). Here one arena per device is registered with
ORT's environment and every session draws on it (`session.use_env_allocators`): the peak is the
largest stage's, and the arena's `max_mem` is the GPU cap. The registration is process-wide, so a
process has one cap per device.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from edgejudge.errors import InputError

if TYPE_CHECKING:
    import onnxruntime

GIB = 2**30
_shared_arenas: dict[int, int] = {}  # CUDA device id -> the arena's max_mem (0: no cap)


def execution_providers(device: str, gpu_mem_gb: float | None = None) -> list:
    """ONNX Runtime providers for "cpu", "cuda" or "cuda:N": CUDA first, the CPU for any operator
    CUDA lacks. On CUDA the device's shared arena is registered here, capped at `gpu_mem_gb`."""
    import onnxruntime as ort

    if device == "cpu":
        if gpu_mem_gb is not None:
            raise InputError("gpu_mem_gb applies to device 'cuda' only")
        return ["CPUExecutionProvider"]
    name, _, index = device.partition(":")
    if name != "cuda" or (index and not index.isdigit()):
        raise InputError(f"device {device!r}: expected cpu, cuda or cuda:N")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InputError("device cuda needs onnxruntime-gpu (pip install 'edgejudge[gpu]')")
    if gpu_mem_gb is not None and not gpu_mem_gb > 0:
        raise InputError(f"gpu_mem_gb must be positive, got {gpu_mem_gb}")
    device_id = int(index or 0)
    share_cuda_arena(device_id, int(gpu_mem_gb * GIB) if gpu_mem_gb is not None else 0)
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def share_cuda_arena(device_id: int, max_mem: int) -> None:
    """Register the process's arena for CUDA device `device_id` (once; `max_mem` 0 is no cap). It
    grows by what is requested, not to the next power of two (ORT's default, which can double a
    multi-GiB activation request)."""
    import onnxruntime as ort

    if device_id in _shared_arenas:
        if _shared_arenas[device_id] != max_mem:
            held = f"{_shared_arenas[device_id] / GIB:g} GiB" if _shared_arenas[device_id] else "no"
            raise InputError(f"this process already runs cuda:{device_id} with {held} cap; "
                             "use one gpu_mem_gb per process")
        return
    info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device_id, ort.OrtMemType.DEFAULT)
    config = ort.OrtArenaCfg({"max_mem": max_mem, "arena_extend_strategy": 1})  # 1: kSameAsRequested
    ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, {"device_id": str(device_id)}, config)
    _shared_arenas[device_id] = max_mem


def provider_name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def open_session(path: str | Path, providers) -> onnxruntime.InferenceSession:
    """A session on `providers`, drawing on the shared arena when it runs on CUDA."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if provider_name(providers[0]) == "CUDAExecutionProvider":
        options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


# how ONNX Runtime's arena (BFCArena) and torch's caching allocator say a request did not fit
OUT_OF_MEMORY = ("Failed to allocate memory", "CUDA out of memory")


@contextmanager
def memory_errors(gpu_mem_gb: float | None) -> Iterator[None]:
    """Turn the backend's out-of-memory error into an InputError of one line: the estimate that
    let the request through was low, or the GPU is shared."""
    try:
        yield
    except Exception as e:  # ORT raises RuntimeException (a RuntimeError), torch OutOfMemoryError
        text = str(e)
        if not any(marker in text for marker in OUT_OF_MEMORY):
            raise
        limit = f"the {gpu_mem_gb:g} GiB cap" if gpu_mem_gb is not None else "the GPU's memory"
        detail = next((line.strip() for line in text.splitlines() if any(m in line for m in OUT_OF_MEMORY)), "")
        raise InputError(f"the request ran out of {limit}: {detail[:200]}") from None
