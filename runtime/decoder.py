"""The text decoder of the Qwen-VL families on ONNX Runtime with a KV cache (numpy + onnxruntime only).

The graphs come from `edgejudge.export.onnx_decoder`: `decoder.onnx` (layers + final norm, fused
ORT ops, KV cache in/out; on CUDA `decoder_cuda.onnx` when exported, the same with the rotary
inside GroupQueryAttention), `lm_head.onnx` (logits only at the positions asked for),
`cache_rows.onnx` (picks cache rows), `splice.onnx` (the decoder's inputs gathered on the device
from the text embeddings and the visual rows: `multimodal_embeds`), `embed.npy` (the
token-embedding table, memory-mapped) and `decoder.npz` (rotary inverse frequencies, the mrope
section and layout, sizes). The graphs' float type (fp32 or fp16) is read from the session;
inputs are cast to it, logits come back float32.

Positions: the prompt's (3, B, S) M-RoPE position ids come from `edgejudge.runtime.model.build_inputs`;
a token decoded at sequence index i sits at i + rope_delta on all three axes
(`decode_position_ids`). `mrope_cos_sin` turns either into the (B, S, head_dim) cos/sin tables
the graph takes. Each rotary frequency j takes its angle from one of the three position axes
(time, height, width), by the family's layout:
- interleaved (Qwen3-VL, HF 5.x `Qwen3VLTextRotaryEmbedding`): height when j % 3 == 1 and
  j < 3 * section[1], width when j % 3 == 2 and j < 3 * section[2], time otherwise;
- contiguous (Qwen2.5-VL): the first section[0] frequencies time, the next section[1] height, the
  last section[2] width.
The half table is repeated twice (rotate-half).

The KV cache lives on the session's device (CUDA when the CUDA provider comes first, else the CPU;
one code path) and never leaves it: every run goes through IO binding. `prefill` allocates, per
layer, a key and a value buffer (B, kv_heads, capacity, head_dim) and binds each as both the past
input and the present output of GroupQueryAttention: ORT then writes the new tokens in place
(shared past/present buffer; `seqlens_k` = valid length - 1 tells it where the valid rows end), so
decoding steps reuse the buffer allocated once per request. A run that would go past a full buffer
lets ORT allocate exactly-sized presents on the device instead (its copy-the-past path), so
`prefill` without a capacity still decodes, one reallocation per step. `repeat_cache` runs
`cache_rows.onnx` (a Gather on axis 0) on the device. Forwards can leave their hidden states on
the device (`on_device=True`); `logits` then reads just the rows it needs there, and only
logits come back to the host.

Greedy decoding runs its one-token steps through a `FixedStep`: every input and output at a fixed
address, bound once per cache buffer set, `total_sequence_length` held at the buffer's capacity
(GroupQueryAttention reads the valid length from `seqlens_k`, on the device). A step then only
writes its token's embedding, cos/sin and length in place. On CUDA that lets ONNX Runtime capture
the step as a CUDA graph once and replay it: a decoding step is ~20 small kernels a layer, and
launching them one by one from the host, not the GPU, is what bounds batch-1 decoding. A prefill
that keeps no cache (candidate-label scoring) is bound the same way per prompt shape
(`FixedPrefill`), the splice writing the embeddings into its input buffers, and captured too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edgejudge.errors import InputError
from edgejudge.runtime.sessions import open_session, provider_name, release_after_runs, session_device

DECODER_NAME, LM_HEAD_NAME, EMBED_NAME, SIDECAR_NAME = "decoder.onnx", "lm_head.onnx", "embed.npy", "decoder.npz"
CACHE_ROWS_NAME, SPLICE_NAME = "cache_rows.onnx", "splice.onnx"
CUDA_DECODER_NAME = "decoder_cuda.onnx"  # the CUDA provider's decoder, when exported (`export.onnx_decoder`)
CAPACITY_STEP = 256  # KV cache capacities are multiples of this when decoding steps are CUDA graphs


def _rope_params(config: Mapping) -> tuple[np.ndarray, list[int], float, bool]:
    """(inv_freq float32, mrope_section, attention_scaling, interleaved) from the exported sidecar
    (preferred: HF's own inv_freq buffer) or from an HF config dict (config.json)."""
    if "inv_freq" in config:
        return (np.asarray(config["inv_freq"], np.float32), [int(s) for s in np.asarray(config["mrope_section"])],
                float(config.get("attention_scaling", 1.0)), bool(config["mrope_interleaved"]))
    from edgejudge.runtime.model import FAMILIES

    if config.get("model_type") not in FAMILIES:
        raise InputError(f"model_type {config.get('model_type')!r} is not one of {', '.join(FAMILIES)}")
    tc = config.get("text_config", config)
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise InputError(f"rope_type {rope.get('rope_type')!r} is not supported")
    theta = float(rope.get("rope_theta", tc.get("rope_theta", 10000.0)))
    dim = int(tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"])
    inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    return (inv_freq, [int(s) for s in rope["mrope_section"]], 1.0,
            FAMILIES[config["model_type"]].MROPE_INTERLEAVED)


def _finite(logits: np.ndarray) -> np.ndarray:
    """`logits`, refused when any is NaN or infinite: a score or token picked from them would be
    a wrong answer given as a right one."""
    if not np.isfinite(logits).all():
        raise InputError("the decoder produced non-finite logits (NaN or inf): the artifact's float type "
                         "overflowed or the device run went wrong; no answer was made from them")
    return logits


def _with_cuda_graph(provider) -> tuple[str, dict]:
    """The CUDA provider entry with CUDA graph capture on (runs opt in by graph id)."""
    name, options = (provider, {}) if isinstance(provider, str) else provider
    return name, {**options, "enable_cuda_graph": "1"}


def frequency_axes(half: int, section: list[int], interleaved: bool) -> np.ndarray:
    """Which position axis (0 time, 1 height, 2 width) drives each of the `half` rotary frequencies."""
    j = np.arange(half)
    if not interleaved:
        return np.searchsorted(np.cumsum(section), j, side="right").clip(max=2)
    axis = np.zeros(half, np.int64)
    axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axis


def mrope_cos_sin(position_ids: np.ndarray, config: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(3, B, S) integer positions -> cos, sin, each (B, S, head_dim) float32, in the family's M-RoPE layout."""
    inv_freq, section, scaling, interleaved = _rope_params(config)
    pos = np.asarray(position_ids)
    if pos.ndim != 3 or pos.shape[0] != 3:
        raise InputError(f"position_ids of shape {pos.shape}: expected (3, batch, seq)")
    axis = frequency_axes(len(inv_freq), section, interleaved)
    # freqs[b, s, j] = pos[axis[j], b, s] * inv_freq[j], a float32 product as in HF's matmul over a
    # 1-wide dim; cos/sin in float64, rounded: within an ulp of torch's float32 kernels. A prompt's
    # positions span a short range with many repeats (a video's tokens share their time index), so
    # each (position, frequency) pair is evaluated once, in a table, and gathered: the same values.
    half = len(inv_freq)
    low = int(pos.min()) if pos.size else 0
    values = np.arange(low, int(pos.max()) + 1 if pos.size else low, dtype=np.int64)
    angles = (values.astype(np.float32)[:, None] * inv_freq).astype(np.float64)  # (P, half)
    table = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)  # (P, 2 * half): cos | sin
    if scaling != 1.0:
        table = table * scaling
    table = table.astype(np.float32).ravel()
    at = (np.moveaxis(pos[axis], 0, -1) - low) * (2 * half) + np.arange(half)  # (B, S, half): each cos
    cos, sin = table.take(at), table.take(at + half)
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)


def decode_position_ids(start: int, count: int, rope_deltas: np.ndarray, batch: int = 1) -> np.ndarray:
    """(3, B, count) positions of tokens at sequence indices start..start+count-1 after a prompt:
    index + rope_delta on all three axes."""
    delta = np.asarray(rope_deltas, np.int64).reshape(-1, 1)
    if delta.shape[0] not in (1, batch):
        raise InputError(f"rope_deltas of shape {np.shape(rope_deltas)} for a batch of {batch}")
    pos = np.arange(start, start + count, dtype=np.int64)[None, :] + delta  # (B or 1, count)
    return np.broadcast_to(pos, (batch, count))[None].repeat(3, axis=0)


@dataclass(frozen=True)
class FixedStep:
    """A bound one-token run: its input buffers (written in place each step), its hidden output,
    and the run options that name its CUDA graph."""

    binding: object
    inputs: dict
    hidden: object
    run_options: object
    total: np.ndarray  # the CPU scalar bound as total_sequence_length (kept alive with the binding)


@dataclass
class FixedPrefill:
    """A bound prompt run of one (batch, length) that keeps no cache (`prefill(keep_cache=False)`):
    its input buffers (the splice writes the embeddings into `inputs`), its one layer's worth of
    key and value buffers, its hidden output, the run options that name its CUDA graph, and the
    rotary tables last written (a control loop's prompts repeat them)."""

    key: tuple[int, int]
    binding: object
    inputs: dict
    cache: list  # the shared key and value buffers (kept alive with the binding)
    hidden: object
    run_options: object  # None: not captured
    total: np.ndarray  # the CPU scalar bound as total_sequence_length (kept alive with the binding)
    tables: tuple | None = None


@dataclass(frozen=True)
class CacheSnapshot:
    """The KV cache at one moment: its buffers (OrtValues) and how much of them is valid."""

    past: list
    length: int
    batch: int


@dataclass(frozen=True)
class VisualRows:
    """A prompt's visual features, by reference: `features` a (R, hidden) table (numpy, or an
    OrtValue on the decoder's device: the vision engine's store) and `feature_rows` (N,) the table
    row of each of the prompt's N vision tokens, in order; for DeepStack, `taps` (R', hidden) and
    `tap_rows` (n_taps, N) likewise."""

    features: object
    feature_rows: np.ndarray
    taps: object = None
    tap_rows: np.ndarray | None = None

    @classmethod
    def of(cls, features: np.ndarray, taps=()) -> VisualRows:
        """Rows of merged arrays: `features` (N, hidden), `taps` (n_taps, N, hidden) or none."""
        n = len(features)
        if not len(taps):
            return cls(features, np.arange(n))
        taps = np.asarray(taps)
        return cls(features, np.arange(n), taps.reshape(len(taps) * n, -1), np.arange(len(taps) * n).reshape(-1, n))

    @staticmethod
    def join(parts: list[VisualRows]) -> VisualRows:
        """The rows of several prompts on the same tables, one after another (a batch's, row-major)."""
        first = parts[0]
        if any(p.features is not first.features or p.taps is not first.taps for p in parts):
            raise InputError("visual rows of one batch must come from the same tables")
        taps = None if first.tap_rows is None else np.concatenate([p.tap_rows for p in parts], axis=1)
        return VisualRows(first.features, np.concatenate([p.feature_rows for p in parts]), first.taps, taps)


def shape_of(value) -> tuple[int, ...]:
    """The shape of a numpy array or an OrtValue."""
    return tuple(value.shape()) if hasattr(value, "data_ptr") else np.shape(value)


def _bind_input(binding, name: str, value, dtype) -> None:
    """Bind numpy (copied to the session's device, cast to `dtype`) or an OrtValue (in place)."""
    if hasattr(value, "data_ptr"):
        binding.bind_ortvalue_input(name, value)
    else:
        binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype))


class TextDecoder:
    """ONNX Runtime sessions on the exported decoder, LM head and cache-row graph, plus the KV cache
    on the sessions' device."""

    def __init__(self, folder: str | Path, providers=("CPUExecutionProvider",), cuda_graph: bool = True,
                 prefill_graph: bool = True):
        """`cuda_graph`: on CUDA, capture greedy decoding's one-token step as a CUDA graph, and with
        `prefill_graph` the prefill that keeps no cache too (`fixed_prefill`: it then keeps its
        activations on the device between requests)."""
        import onnxruntime as ort

        self.folder = Path(folder)
        names = (DECODER_NAME, LM_HEAD_NAME, CACHE_ROWS_NAME, SPLICE_NAME, EMBED_NAME, SIDECAR_NAME)
        missing = [n for n in names if not (self.folder / n).is_file()]
        if missing:
            raise InputError(f"{self.folder}: no exported decoder (missing {', '.join(missing)})")
        with np.load(self.folder / SIDECAR_NAME) as data:
            self.rope = {k: data[k] for k in ("inv_freq", "mrope_section", "attention_scaling", "mrope_interleaved")}
            self.hidden_size = int(data["hidden_size"])
            self.head_dim = int(data["head_dim"])
            self.num_layers = int(data["num_layers"])
            self.num_kv_heads = int(data["num_kv_heads"])
            self.num_deepstack = int(data["num_deepstack"])
            self.vocab_size = int(data["vocab_size"])
        self.embed_table = np.load(self.folder / EMBED_NAME, mmap_mode="r")
        providers = list(providers)
        cuda = provider_name(providers[0]) == "CUDAExecutionProvider"
        self.cuda_graph = cuda_graph and cuda
        decoder_providers = [_with_cuda_graph(providers[0]), *providers[1:]] if self.cuda_graph else providers
        self.providers = providers
        # on CUDA the decoder whose attention applies the rotary itself (`write_cuda_decoder`)
        decoder = CUDA_DECODER_NAME if cuda and (self.folder / CUDA_DECODER_NAME).is_file() else DECODER_NAME
        self.session, self.head, self.splice = (
            open_session(self.folder / name, chosen)
            for name, chosen in ((decoder, decoder_providers), (LM_HEAD_NAME, providers),
                                 (SPLICE_NAME, providers)))
        self.device, self.device_id = session_device(self.session)  # where the cache and hidden states live
        self.dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        self.head_dtype = np.float16 if self.head.get_inputs()[0].type == "tensor(float16)" else np.float32
        self.past: list[tuple[ort.OrtValue, ort.OrtValue]] = []
        self.past_length = 0
        self.batch = 0
        # every run but the fixed steps' own: no CUDA graph (prefills change shape from run to run)
        self.run_options = ort.RunOptions()
        # the splice's gathers are as large as its outputs: handed back when it ends, not held
        self.splice_options = release_after_runs(providers)
        # Until a step is captured, each run hands the decoder arena's free memory back too: the
        # arena grows by exactly what a request asks, so the next prefill, whose requests come in
        # another order or as one memory-pattern block, would otherwise add regions beside the
        # free ones (W1 int4 on the H100: peaks of 5.57, 6.26, then 6.71 GiB from the third
        # decision on; with the hand-back 5.42, then 5.63).
        self.release_options = release_after_runs(providers)
        if self.cuda_graph:
            self.run_options.add_run_config_entry("gpu_graph_id", "-1")
            self.release_options.add_run_config_entry("gpu_graph_id", "-1")
        self.cache_rows: ort.InferenceSession | None = None  # opened by the first repeat_cache
        self.fixed: tuple[tuple, FixedStep] | None = None  # the bound step and the cache buffers it is bound to
        self.uncached: FixedPrefill | None = None  # the bound prefill that keeps no cache, of the last shape
        self.prefill_graph = prefill_graph and self.cuda_graph
        self.graphs_captured = 0
        self.last_rotary: tuple[np.ndarray, tuple[np.ndarray, np.ndarray]] | None = None  # positions, (cos, sin)

    # -- inputs ---------------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """(B, S) token ids -> (B, S, hidden) in the decoder's float type."""
        ids = np.asarray(input_ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(f"token ids outside the vocabulary of {self.vocab_size}")
        return np.asarray(self.embed_table[ids], self.dtype)

    def cos_sin(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`mrope_cos_sin` for this decoder, read-only. The last positions' tables are kept: a
        control loop prefills the same prompt every decision (W1: 4.7 ms a decision on the H100
        host for 2 x 1874 tokens)."""
        positions = np.asarray(position_ids)
        if self.last_rotary is not None and np.array_equal(self.last_rotary[0], positions):
            return self.last_rotary[1]
        tables = mrope_cos_sin(positions, self.rope)
        for table in tables:
            table.flags.writeable = False
        self.last_rotary = (positions.copy(), tables)
        return tables

    def multimodal_embeds(self, input_ids: np.ndarray, vision_token_id: int, visual: VisualRows,
                          out: dict | None = None):
        """The decoder's inputs for a prompt batch, as OrtValues on the device: token embeddings
        with the visual features at the vision-token positions (the video's or the image's pad
        token; HF's masked_scatter, row-major over the batch) and the (n_taps, B, S, hidden)
        DeepStack input (the taps at the same positions, zeros elsewhere; None without DeepStack).
        `splice.onnx` gathers them where the features are; only the text rows and indexes travel.
        `out`: buffers named `inputs_embeds` (and `deepstack`) to write them into (a bound
        prefill's, `fixed_prefill`), else new ones."""
        ids = np.asarray(input_ids, np.int64)
        mask = ids == vision_token_id
        if int(mask.sum()) != len(visual.feature_rows):
            raise InputError(f"{int(mask.sum())} vision tokens but {len(visual.feature_rows)} visual features")
        taps = 0 if visual.tap_rows is None else len(visual.tap_rows)
        if taps != self.num_deepstack:
            raise InputError(f"{taps} DeepStack taps, the decoder takes {self.num_deepstack}")
        text_ids = ids[~mask]
        # a position takes its row from `text` or from `features` (Where on the mask); the other
        # index is 0 there, so each table needs a row
        text = self.embed(text_ids) if len(text_ids) else np.zeros((1, self.hidden_size), self.dtype)
        text_index, feature_index = np.zeros(ids.shape, np.int64), np.zeros(ids.shape, np.int64)
        text_index[~mask] = np.arange(len(text_ids))
        feature_index[mask] = visual.feature_rows
        empty = np.zeros((1, self.hidden_size), self.dtype)
        binding = self.splice.io_binding()
        feeds = {"text": text, "features": visual.features if shape_of(visual.features)[0] else empty,
                 "vision_mask": mask, "text_index": text_index, "feature_index": feature_index}
        if taps:
            tap_index = np.zeros((taps, *ids.shape), np.int64)
            tap_index[:, mask] = visual.tap_rows
            feeds.update(taps=visual.taps if shape_of(visual.taps)[0] else empty, tap_index=tap_index)
        for name, value in feeds.items():
            _bind_input(binding, name, value, value.dtype if isinstance(value, np.ndarray) else self.dtype)
        for output in self.splice.get_outputs():
            if out is None:
                binding.bind_output(output.name, self.device, self.device_id)
            else:
                binding.bind_ortvalue_output(output.name, out[output.name])
        self.splice.run_with_iobinding(binding, self.splice_options)
        outputs = binding.get_outputs()
        return outputs[0], (outputs[1] if taps else None)

    def visual_arrays(self, visual: VisualRows) -> tuple[np.ndarray, np.ndarray | None]:
        """A prompt's visual features (N, hidden) and DeepStack taps (n_taps, N, hidden; None
        without DeepStack), copied to the host: only its rows travel, gathered by `splice.onnx`."""
        every = np.full((1, len(visual.feature_rows)), -1, np.int64)  # every position a vision token
        embeds, deepstack = self.multimodal_embeds(every, -1, visual)
        return embeds.numpy()[0], (None if deepstack is None else deepstack.numpy()[:, 0])

    # -- the cache ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Tokens the cache buffers hold (valid or not)."""
        return self.past[0][0].shape()[2] if self.past else 0

    def cache_shape(self) -> tuple[int, int, int, int]:
        """(B, kv_heads, valid length, head_dim) of each layer's key and value cache."""
        return self.batch, self.num_kv_heads, self.past_length, self.head_dim

    def kv_cache_bytes(self, rows: int, tokens: int) -> int:
        """Bytes of a cache of `rows` sequences of `tokens` tokens (keys and values of every layer)."""
        return self.num_layers * 2 * rows * self.num_kv_heads * tokens * self.head_dim * np.dtype(self.dtype).itemsize

    def reset(self, batch: int = 1, capacity: int = 0) -> None:
        """An empty cache of `batch` rows with room for `capacity` tokens each, on the device. The
        current buffers are kept when they have that shape (so a captured decoding step stays
        valid from one request to the next); with CUDA graphs the capacity is rounded up to
        CAPACITY_STEP tokens so that requests of similar lengths share buffers."""
        if self.cuda_graph:
            capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        shape = [batch, self.num_kv_heads, capacity, self.head_dim]
        if not (self.past and self.past[0][0].shape() == shape):
            self.past, self.fixed = [], None  # free the old cache (and the step bound to it) first
            self.past = [(self._buffer(shape), self._buffer(shape)) for _ in range(self.num_layers)]
        self.past_length = 0
        self.batch = batch

    def snapshot(self) -> CacheSnapshot:
        """The cache as it is now, by reference (no copy), for `restore`."""
        return CacheSnapshot(list(self.past), self.past_length, self.batch)

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Put a snapshot's cache back, until the next prefill (which may reuse the buffers).
        Until then nothing overwrites the rows a snapshot covers: steps write only at or past the
        current length (in place, or into new buffers when full) and repeat_cache writes new
        buffers. So restoring truncates the cache to the snapshot's length; what later steps
        wrote past it is ignored (seqlens_k) and overwritten by the next step."""
        self.past, self.past_length, self.batch = list(snapshot.past), snapshot.length, snapshot.batch

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached tokens; the next run writes over the rest (as `restore`).
        A multi-turn conversation whose re-rendered text differs from what the cache holds goes
        back to the first difference this way instead of starting over."""
        if not 0 <= length <= self.past_length:
            raise InputError(f"cannot truncate a cache of {self.past_length} tokens to {length}")
        self.past_length = length

    def repeat_cache(self, repeats: int) -> None:
        """Repeat every cached row `repeats` times (row r -> rows r*repeats .. r*repeats+repeats-1),
        so several continuations of one prefilled prompt run as one batch. On the device: new
        buffers of the same capacity, written by cache_rows.onnx."""
        if not self.past:
            raise InputError("repeat_cache() before prefill()")
        if self.cache_rows is None:  # opened when first needed: a session holds device memory of its own
            self.cache_rows = open_session(self.folder / CACHE_ROWS_NAME, self.providers)
        binding = self.cache_rows.io_binding()
        binding.bind_cpu_input("rows", np.repeat(np.arange(self.batch, dtype=np.int64), repeats))
        for i, (key, value) in enumerate(self.past):
            for kind, buffer in (("key", key), ("value", value)):
                binding.bind_ortvalue_input(f"{kind}_{i}", buffer)
                binding.bind_output(f"{kind}_{i}_rows", self.device, self.device_id)
        self.cache_rows.run_with_iobinding(binding)
        out = binding.get_outputs()
        self.past = [(out[2 * i], out[2 * i + 1]) for i in range(self.num_layers)]
        self.batch *= repeats

    # -- running --------------------------------------------------------------------------------
    def _run(self, inputs_embeds, cos, sin, deepstack):
        """One decoder run through IO binding: the hidden states as an OrtValue on the device."""
        b, s, hidden = shape_of(inputs_embeds)
        if hidden != self.hidden_size:
            raise InputError(f"inputs_embeds of hidden size {hidden}, the decoder takes {self.hidden_size}")
        if b != self.batch:
            raise InputError(f"a batch of {b} for a cache of batch {self.batch}: call reset(batch) / prefill first")
        for name, table in (("cos", cos), ("sin", sin)):
            if np.shape(table) != (b, s, self.head_dim):
                raise InputError(f"{name} of shape {np.shape(table)}, expected {(b, s, self.head_dim)}")
        total = self.past_length + s
        in_place = total <= self.capacity
        if not in_place and self.past_length < self.capacity:
            raise InputError(f"{s} tokens after {self.past_length} do not fit the KV cache of {self.capacity}: "
                             f"prefill with capacity >= {total}")
        binding = self.session.io_binding()
        _bind_input(binding, "inputs_embeds", inputs_embeds, self.dtype)
        binding.bind_cpu_input("cos", np.ascontiguousarray(cos, self.dtype))
        binding.bind_cpu_input("sin", np.ascontiguousarray(sin, self.dtype))
        if self.num_deepstack:
            if deepstack is None:
                deepstack = np.zeros((self.num_deepstack, b, s, hidden), self.dtype)
            elif shape_of(deepstack) != (self.num_deepstack, b, s, hidden):
                raise InputError(f"deepstack of shape {shape_of(deepstack)}, expected "
                                 f"{(self.num_deepstack, b, s, hidden)}")
            _bind_input(binding, "deepstack", deepstack, self.dtype)
        elif deepstack is not None:
            raise InputError("this decoder takes no DeepStack input")
        binding.bind_cpu_input("seqlens_k", np.full((b,), total - 1, np.int32))  # no padding: every row is `total` long
        binding.bind_cpu_input("total_sequence_length", np.asarray(total, np.int32))
        binding.bind_output("hidden", self.device, self.device_id)
        for i, (key, value) in enumerate(self.past):
            for kind, buffer in (("key", key), ("value", value)):
                binding.bind_ortvalue_input(f"past_{kind}_{i}", buffer)
                if in_place:  # past and present are one buffer: GQA appends the new tokens in place
                    binding.bind_ortvalue_output(f"present_{kind}_{i}", buffer)
                else:  # a full buffer: ORT allocates presents of exactly `total` tokens on the device
                    binding.bind_output(f"present_{kind}_{i}", self.device, self.device_id)
        self.session.run_with_iobinding(binding, self._uncaptured_options())
        outputs = binding.get_outputs()
        if not in_place:
            self.past = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.num_layers)]
        self.past_length = total
        return outputs[0]

    def prefill(self, inputs_embeds, cos: np.ndarray, sin: np.ndarray, deepstack=None,
                capacity: int | None = None, on_device: bool = False, keep_cache: bool = True):
        """Run the prompt from an empty cache with room for `capacity` tokens (give prompt + tokens
        to come so the steps write in place): the (B, S, hidden) final-norm hidden states, as numpy
        or, with `on_device`, as the OrtValue on the device (for `logits`). `inputs_embeds` and
        `deepstack`: numpy or OrtValues on the device (`multimodal_embeds`).
        Without `capacity` the cache is the prompt's, allocated by the run itself (ORT's path for a
        full buffer, from an empty one): its exact size, in the session's arena, not in the
        Python-side one that `reset` allocates from, which grows by powers of two.
        `keep_cache=False`, for a prefill whose logits are all that is read (no step follows), runs
        the bound prefill of this shape (`fixed_prefill`): no cache is left after it, and the
        hidden states it returns are its output buffer, valid until the next such prefill."""
        b, s = shape_of(inputs_embeds)[:2]
        if not keep_cache:
            if capacity is not None:
                raise InputError("a prefill that keeps no cache takes no capacity")
            return self._run_fixed_prefill(inputs_embeds, cos, sin, deepstack, on_device)
        self.reset(b, max(s, capacity) if capacity else 0)
        hidden = self._run(inputs_embeds, cos, sin, deepstack)
        return hidden if on_device else hidden.numpy()

    def fixed_prefill(self, batch: int, length: int) -> FixedPrefill:
        """The bound prefill that keeps no cache for (batch, length) prompts, bound again only when
        the shape changes. Every layer writes its keys and values into one shared pair of buffers,
        each layer's attention done before the next layer overwrites them, so the run holds one
        layer's cache instead of all of them (W1 on Qwen3-VL-4B: 14 MB instead of 0.51 GiB). Every
        input and output sits at a fixed address, so with `prefill_graph` ONNX Runtime captures the
        run as a CUDA graph and replays it: ~1,000 kernels, which launched one by one from the host
        left the GPU idle for 12-22 ms of W1's 79-90 ms prefill on the H100 (2026-11-23). The
        graph's activations then stay in the session's arena (W1 int4: 1.2 GiB, and a peak of 5.68
        GiB instead of 4.77); without it each run hands the arena's free memory back. The bound
        buffers stay allocated while the shape repeats (W1: 0.12 GiB)."""
        import onnxruntime as ort

        if self.uncached is not None and self.uncached.key == (batch, length):
            return self.uncached
        self.uncached = None  # release the old binding and its buffers first
        hidden, dim = self.hidden_size, self.head_dim
        inputs = {"inputs_embeds": self._buffer([batch, length, hidden]), "cos": self._buffer([batch, length, dim]),
                  "sin": self._buffer([batch, length, dim]),
                  "seqlens_k": ort.OrtValue.ortvalue_from_numpy(np.full((batch,), length - 1, np.int32),
                                                                self.device, self.device_id)}
        if self.num_deepstack:
            inputs["deepstack"] = self._buffer([self.num_deepstack, batch, length, hidden])
        total, out = np.asarray(length, np.int32), self._buffer([batch, length, hidden])
        cache = [self._buffer([batch, self.num_kv_heads, length, dim]) for _ in range(2)]
        binding = self._bound_run(inputs, total, out, [cache] * self.num_layers)
        # not captured (None): the run takes `_uncaptured_options()`
        run_options = self._graph_options() if self.prefill_graph else None
        self.uncached = FixedPrefill((batch, length), binding, inputs, cache, out, run_options, total)
        return self.uncached

    def _run_fixed_prefill(self, inputs_embeds, cos: np.ndarray, sin: np.ndarray, deepstack, on_device: bool):
        """`prefill(keep_cache=False)`: the inputs written into the bound prefill's buffers (nothing
        to write when the splice wrote them there, or when the rotary tables are the last ones),
        then its run."""
        b, s, hidden = shape_of(inputs_embeds)
        if hidden != self.hidden_size:
            raise InputError(f"inputs_embeds of hidden size {hidden}, the decoder takes {self.hidden_size}")
        if self.num_deepstack and deepstack is None:
            deepstack = np.zeros((self.num_deepstack, b, s, hidden), self.dtype)
        elif not self.num_deepstack and deepstack is not None:
            raise InputError("this decoder takes no DeepStack input")
        fixed = self.fixed_prefill(b, s)
        for name, value in (("inputs_embeds", inputs_embeds), ("deepstack", deepstack)):
            if value is None:
                continue
            target = fixed.inputs[name]
            if shape_of(value) != tuple(target.shape()):
                raise InputError(f"{name} of shape {shape_of(value)}, expected {tuple(target.shape())}")
            if not (hasattr(value, "data_ptr") and value.data_ptr() == target.data_ptr()):
                target.update_inplace(np.ascontiguousarray(value.numpy() if hasattr(value, "data_ptr") else value,
                                                           self.dtype))
        # `cos_sin`'s tables are read-only and kept while the positions repeat: the same objects
        # hold the same values
        if not (fixed.tables and fixed.tables[0] is cos and fixed.tables[1] is sin and not cos.flags.writeable
                and not sin.flags.writeable):
            for name, table in (("cos", cos), ("sin", sin)):
                if np.shape(table) != (b, s, self.head_dim):
                    raise InputError(f"{name} of shape {np.shape(table)}, expected {(b, s, self.head_dim)}")
                fixed.inputs[name].update_inplace(np.ascontiguousarray(table, self.dtype))
            fixed.tables = (cos, sin)
        self.past, self.fixed, self.past_length, self.batch = [], None, 0, 0  # no cache is left
        self.session.run_with_iobinding(fixed.binding, fixed.run_options or self._uncaptured_options())
        return fixed.hidden if on_device else fixed.hidden.numpy()

    def _uncaptured_options(self):
        """A run that is not captured hands the arena's free memory back, until a graph is captured."""
        return self.release_options if not self.graphs_captured else self.run_options

    def step(self, inputs_embeds, cos: np.ndarray, sin: np.ndarray, deepstack=None, on_device: bool = False):
        """Extend the cached sequence by S >= 1 tokens (no DeepStack unless given): (B, S, hidden),
        numpy or (`on_device`) an OrtValue on the device."""
        if not self.past:
            raise InputError("step() before prefill()")
        hidden = self._run(inputs_embeds, cos, sin, deepstack)
        return hidden if on_device else hidden.numpy()

    def fixed_step(self) -> FixedStep:
        """The bound one-token run for the current cache buffers. Bound again (and on CUDA, captured
        as a new graph) only when the buffers change: a new shape of cache, or a cache that grew
        past its capacity. The binding holds the buffers, so a captured graph never writes
        through a freed one."""
        import onnxruntime as ort

        key = (self.batch, tuple(buffer.data_ptr() for pair in self.past for buffer in pair))
        if self.fixed and self.fixed[0] == key:
            return self.fixed[1]
        self.fixed = None  # release the old binding and the buffers it holds first
        b, hidden, dim = self.batch, self.hidden_size, self.head_dim
        inputs = {"inputs_embeds": self._buffer([b, 1, hidden]), "cos": self._buffer([b, 1, dim]),
                  "sin": self._buffer([b, 1, dim]), "seqlens_k": self._buffer([b], np.int32)}
        if self.num_deepstack:  # decoded tokens carry no visual features
            inputs["deepstack"] = ort.OrtValue.ortvalue_from_numpy(
                np.zeros((self.num_deepstack, b, 1, hidden), self.dtype), self.device, self.device_id)
        total = np.asarray(self.capacity, np.int32)  # fixed: the valid length travels in seqlens_k
        out = self._buffer([b, 1, hidden])
        binding = self._bound_run(inputs, total, out, self.past)
        run_options = self._graph_options() if self.cuda_graph else self.run_options
        self.fixed = key, FixedStep(binding, inputs, out, run_options, total)
        return self.fixed[1]

    def _buffer(self, shape: list[int], dtype=None):
        """An OrtValue of `shape` on the decoder's device, in its float type unless `dtype` is given."""
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype or self.dtype, self.device, self.device_id)

    def _bound_run(self, inputs: dict, total: np.ndarray, hidden, past: list):
        """An IO binding of the decoder with everything at a fixed address: `inputs` (OrtValues by
        name), `total` (the CPU scalar total_sequence_length), the `hidden` output, and each layer's
        (key, value) pair in `past` as both its past input and its present output."""
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_cpu_input("total_sequence_length", total)
        binding.bind_ortvalue_output("hidden", hidden)
        for i, pair in enumerate(past):
            for kind, buffer in zip(("key", "value"), pair):
                binding.bind_ortvalue_input(f"past_{kind}_{i}", buffer)
                binding.bind_ortvalue_output(f"present_{kind}_{i}", buffer)
        return binding

    def _graph_options(self):
        """Run options that name a new CUDA graph of the decoder session (captured by ONNX Runtime
        after its first runs with them)."""
        import onnxruntime as ort

        self.graphs_captured += 1
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(self.graphs_captured))
        return options

    def step_token(self, token_ids: np.ndarray, rope_deltas: np.ndarray):
        """Extend the cache by one token per row ((B,) ids) through the fixed step; needs a free
        row in the buffers. The (B, 1, hidden) hidden states as an OrtValue on the device, valid
        until the next step."""
        if self.past_length >= self.capacity:
            raise InputError(f"no room after {self.past_length} tokens in the KV cache of {self.capacity}")
        step = self.fixed_step()
        cos, sin = self.cos_sin(decode_position_ids(self.past_length, 1, rope_deltas, self.batch))
        step.inputs["inputs_embeds"].update_inplace(self.embed(np.asarray(token_ids).reshape(self.batch, 1)))
        step.inputs["cos"].update_inplace(np.ascontiguousarray(cos, self.dtype))
        step.inputs["sin"].update_inplace(np.ascontiguousarray(sin, self.dtype))
        step.inputs["seqlens_k"].update_inplace(np.full((self.batch,), self.past_length, np.int32))
        self.session.run_with_iobinding(step.binding, step.run_options)
        self.past_length += 1
        return step.hidden

    def logits(self, hidden, positions: slice | None = None) -> np.ndarray:
        """(B, K, hidden) hidden states -> (B, K, vocab) float32 logits; `positions` selects the K
        sequence positions (a slice, default all). `hidden` is numpy or a forward's OrtValue; an
        OrtValue stays on the device: the head reads each row's stretch of positions in place
        (one head run per row unless all positions are asked for) and only logits come back."""
        if isinstance(hidden, np.ndarray):
            if hidden.ndim == 2:
                hidden = hidden[:, None]
            rows = np.ascontiguousarray(hidden[:, positions or slice(None)], self.head_dtype)
            return _finite(self.head.run(None, {"hidden": rows})[0])
        batch, length, width = hidden.shape()
        start, stop, stride = (positions or slice(None)).indices(length)
        if stride != 1 or stop <= start:
            raise InputError(f"positions {positions} must be a non-empty stretch of the {length} positions")
        count = stop - start
        # all positions: the whole tensor in one run; else one run per row on its stretch
        runs = [(0, batch)] if count == length else [(row, 1) for row in range(batch)]
        itemsize = np.dtype(self.dtype).itemsize
        logits = []
        for row, rows in runs:
            binding = self.head.io_binding()
            binding.bind_input("hidden", self.device, self.device_id, self.dtype, [rows, count, width],
                               hidden.data_ptr() + (row * length + start) * width * itemsize)
            binding.bind_output("logits", "cpu")
            self.head.run_with_iobinding(binding)
            logits.append(binding.get_outputs()[0].numpy())
        return _finite(np.concatenate(logits))

    def greedy(self, first_logits: np.ndarray, start: int, rope_deltas: np.ndarray, max_new_tokens: int,
               eos_token_ids=(), return_logits: bool = False, repetition_penalty: float = 1.0,
               context_ids: np.ndarray | None = None, on_token: Callable[[int], None] | None = None):
        """Greedy decoding of one sequence after prefill: `first_logits` (vocab,) at the prompt's
        last position, `start` the prompt length. Stops after an EOS token (included).
        `on_token` is called with each token as soon as it is picked (streaming).

        `repetition_penalty` (generation_config.json's; HF applies it under greedy too) divides
        positive / multiplies negative logits of every token already in the sequence: the
        `context_ids` (the prompt) and the tokens generated so far.
        Returns the tokens, and with `return_logits` also each step's raw (vocab,) logits."""
        eos = {int(t) for t in np.atleast_1d(eos_token_ids)} if eos_token_ids is not None else set()
        seen = np.zeros(self.vocab_size, bool)
        if context_ids is not None:
            seen[np.asarray(context_ids, np.int64).ravel()] = True

        def pick(logits: np.ndarray) -> int:
            if repetition_penalty != 1.0:
                logits = logits.copy()
                hit = logits[seen]
                logits[seen] = np.where(hit < 0, hit * np.float32(repetition_penalty), hit / np.float32(repetition_penalty))
            token = int(np.argmax(logits))
            seen[token] = True
            return token

        steps = [np.asarray(first_logits, np.float32)]
        tokens = [pick(steps[0])]
        if on_token:
            on_token(tokens[-1])
        for index in range(start, start + max_new_tokens - 1):
            if tokens[-1] in eos:
                break
            if index != self.past_length:
                raise InputError(f"greedy from position {start} on a cache of {self.past_length} tokens")
            if index < self.capacity:  # room in the buffers: the fixed (on CUDA, graph-captured) step
                hidden = self.step_token(np.array([tokens[-1]]), rope_deltas)
            else:
                cos, sin = self.cos_sin(decode_position_ids(index, 1, rope_deltas))
                hidden = self.step(self.embed(np.array([[tokens[-1]]])), cos, sin, on_device=True)
            steps.append(self.logits(hidden)[0, -1])
            tokens.append(pick(steps[-1]))
            if on_token:
                on_token(tokens[-1])
        return (tokens, steps) if return_logits else tokens
