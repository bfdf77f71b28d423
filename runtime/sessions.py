"""ONNX Runtime sessions on the CPU or one CUDA device, under an optional GPU memory cap.

Each session (vision, decoder, LM head, cache rows, splice) has its own CUDA memory arena, capped
at the cap (`gpu_mem_limit`) and grown by what a run asks (not to the next power of two, ORT's
default, which can double a multi-GiB activation request). An arena keeps what its largest run
took, so the vision and splice sessions hand their free memory back to the device after each run
(`release_after_runs`): their intermediates are not held while the decoder prefills. The decoder
does the same until it captures a CUDA graph. Without a cap the candidate-label prefill is
captured and the vision session keeps its arena too (speed first).

Host buffers that are uploaded on every request (the vision graph's patch levels) are page-locked
(`pin_host_memory`), through the CUDA runtime that the CUDA provider loaded.

One arena per device shared by all sessions (ORT's environment allocator,
`session.use_env_allocators`) was the runtime's setting for one session on 2026-11-23; on the H100
it gave NaN label scores and greedy tokens of 0 on a full-size Qwen3-VL-4B (fp16 and int4, with or
without the decoder's CUDA graph) where per-session arenas give HF's tokens. It is not used.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from edgejudge.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

GIB = 2**30


def execution_providers(device: str, gpu_mem_gb: float | None = None) -> list:
    """ONNX Runtime providers for "cpu", "cuda" or "cuda:N": CUDA first, the CPU for any operator
    CUDA lacks. `gpu_mem_gb` caps each session's CUDA arena."""
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
    options = {"device_id": int(index or 0), "arena_extend_strategy": "kSameAsRequested"}
    if gpu_mem_gb is not None:
        if not gpu_mem_gb > 0:
            raise InputError(f"gpu_mem_gb must be positive, got {gpu_mem_gb}")
        options["gpu_mem_limit"] = int(gpu_mem_gb * GIB)
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def provider_name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def open_session(path: str | Path, providers) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=list(providers))


def session_device(session: onnxruntime.InferenceSession) -> tuple[str, int]:
    """("cuda", id) or ("cpu", 0): where a session's outputs and the buffers bound to it live, the
    device of the provider ONNX Runtime actually runs first."""
    if session.get_providers()[0] == "CUDAExecutionProvider":
        return "cuda", int(session.get_provider_options()["CUDAExecutionProvider"]["device_id"])
    return "cpu", 0


def release_after_runs(providers) -> onnxruntime.RunOptions:
    """Run options that hand a CUDA session's free arena memory back to the device when a run
    ends (nothing on the CPU). Not for a session that replays CUDA graphs: a captured graph keeps
    using buffers its arena counts as free."""
    import onnxruntime as ort

    options = ort.RunOptions()
    first = providers[0]
    if provider_name(first) == "CUDAExecutionProvider":
        device_id = first[1].get("device_id", 0) if isinstance(first, tuple) else 0
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{device_id}")
    return options


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


# the CUDA runtime's names on Linux and Windows, newest first: onnxruntime-gpu's CUDA provider
# loads one of them into the process before any session runs
CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "cudart64_13.dll", "cudart64_12.dll")
CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the calling thread's


def cuda_runtime() -> ctypes.CDLL | None:
    """The CUDA runtime library in the process (loaded with the CUDA provider's first session),
    or None before then or without one."""
    for name in CUDART_NAMES:
        try:
            library = _cuda_library(name)
        except OSError:
            continue
        return library
    return None


@functools.cache
def _cuda_library(name: str) -> ctypes.CDLL:
    library = ctypes.CDLL(name)
    library.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    library.cudaHostUnregister.argtypes = [ctypes.c_void_p]
    return library


def pin_host_memory(array: np.ndarray, runtime=None) -> bool:
    """Page-lock `array`'s memory with CUDA for as long as the array lives, so that ONNX Runtime
    copies it to the device by DMA straight from it rather than through a staging buffer (W1's
    19 MB of patch levels a decision on the H100: 0.36 ms a copy against 1.41, the vision runs
    29.4 ms against 32.5; 2026-11-24). For buffers that are kept and reused. False (and the
    array stays pageable) when no CUDA runtime is loaded or CUDA refuses; the copies give the
    same bytes either way. `runtime`: the library (`cuda_runtime()` by default)."""
    library = runtime or cuda_runtime()
    if library is None or not array.nbytes or array.base is not None or not array.flags.c_contiguous:
        return False
    address = array.ctypes.data
    if library.cudaHostRegister(address, array.nbytes, CUDA_HOST_REGISTER_PORTABLE) != 0:
        library.cudaGetLastError()  # clear the error, which the next CUDA call would report
        return False
    # numpy runs an array's weak-reference callbacks before it frees the memory
    weakref.finalize(array, library.cudaHostUnregister, address)
    return True
