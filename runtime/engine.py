"""The judge engine on ONNX Runtime: candidate-label scoring, multi-view batches, a vision-group
cache and greedy decoding. numpy + onnxruntime only: this ships to the robot.

- Candidate labels: the shared prompt is prefilled once per view; each label's first token is
  scored by the prompt's last logits. When one label has more than one token (RoboCasa's "not
  complete"), the prefill carries its tokens after the prompt: one forward scores every label,
  and no cache outlives it (its layers share one layer's worth of KV buffers:
  `TextDecoder.prefill(keep_cache=False)`). Labels of more than one token otherwise run as one
  batch on the prefilled KV cache, repeated on the device once per such label (one step for
  labels of up to two tokens); shorter labels are padded at the end. Causal attention keeps every position blind
  to what follows it, so this equals scoring each label with its own full forward.
  Score = summed NLL / label token count (lower is better).
- Views: the views of one decision whose prompts have the same length run as one batch in the
  vision encoder and the prefill; views of other lengths run one after another.
- Vision cache: the vision graph runs one 2-frame group per batch row and no attention crosses
  groups, so a group's outputs depend only on its frames and target size. They stay on the
  device, in a store of rows the decoder's inputs are gathered from, and are cached there: a
  sliding window re-encodes only its new groups.
- GPU memory cap: before any session loads, and before each request, the weights on the device
  (the graphs' files) plus the request's KV cache are estimated; over the cap is an InputError
  naming the estimate, not an out-of-memory error halfway through a run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgejudge.errors import InputError
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.decoder import TextDecoder, VisualRows, decode_position_ids
from edgejudge.runtime.preprocess import preprocess_video_levels
from edgejudge.runtime.sessions import execution_providers, pin_host_memory
from edgejudge.runtime.video import Clip
from edgejudge.runtime.vision import load_vision_encoder

VISION_NAME = "vision.onnx"
CACHE_GROUPS = 128  # 2-frame groups the vision cache keeps by default (W1: two decisions' worth)
DIGITS = ("1", "2", "3", "4", "5")
PROMPTS_KEPT = 16  # prompt text sides `Engine.prompt` keeps (a rubric's axes, a batch's views)


def digit_token_ids(prompter) -> list[int]:
    """The token ids of the digits 1-5, which a score distribution reads (one token each)."""
    ids = [prompter.encode(d) for d in DIGITS]
    if any(len(i) != 1 for i in ids):
        raise InputError("the tokenizer does not encode each digit 1-5 as one token")
    return [int(i[0]) for i in ids]


def digit_probabilities(digit_logits: np.ndarray) -> np.ndarray:
    """The probabilities of the digits 1-5 at one position: a softmax over their five logits."""
    chosen = np.asarray(digit_logits, np.float64)
    probs = np.exp(chosen - chosen.max())
    return probs / probs.sum()


def device_weight_bytes(folder: Path) -> int:
    """Bytes of the weights the sessions load onto the device: every graph with its external data,
    plus the table a float LM head reads from an .npy (lm_head.npy, or embed.npy when tied; an
    int8 head keeps its weights in lm_head.onnx.data)."""
    files = [*folder.glob("*.onnx"), *folder.glob("*.onnx.data")]
    if not (folder / "lm_head.onnx.data").is_file():
        files.append(folder / ("lm_head.npy" if (folder / "lm_head.npy").is_file() else "embed.npy"))
    return sum(f.stat().st_size for f in files)


def check_gpu_memory(gpu_mem_gb: float | None, weight_bytes: int, kv_bytes: int = 0, request: str = "") -> None:
    """InputError when weights + KV cache are estimated over the cap (activations not counted)."""
    if gpu_mem_gb is not None and weight_bytes + kv_bytes > gpu_mem_gb * 2**30:
        gib = 2**30
        raise InputError(f"an estimated {(weight_bytes + kv_bytes) / gib:.3g} GiB on the GPU (weights "
                         f"{weight_bytes / gib:.3g} GiB + KV cache {kv_bytes / gib:.3g} GiB{request}) is over "
                         f"the {gpu_mem_gb:g} GiB cap")


def generation_config(model: runtime_model.Model) -> dict:
    path = model.path / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def eos_token_ids(model: runtime_model.Model) -> set[int]:
    """EOS ids from generation_config.json (int or list) and the tokenizer's eos_token."""
    ids = {int(i) for i in np.atleast_1d(generation_config(model).get("eos_token_id") or [])}
    if (token := model.prompter.special_tokens.get("eos_token")) is not None:
        ids.add(model.prompter.token_id(token))
    return ids


def label_positions(arrays: dict, label_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and (3, 1, S + L) positions of prompt + label: text after the prompt goes on at
    index + rope delta on all three axes. (A prefill's carried label tokens; the tests' per-label
    full-forward reference.)"""
    prompt_len = arrays["input_ids"].shape[1]
    ids = np.concatenate([arrays["input_ids"], label_ids[None]], axis=1)
    positions = np.concatenate(
        [arrays["position_ids"], decode_position_ids(prompt_len, len(label_ids), arrays["rope_deltas"])], axis=2)
    return ids, positions


WORKERS = min(8, os.cpu_count() or 1)  # threads for the per-group host work


def _workers() -> ThreadPoolExecutor:
    """Threads for the per-group host work (cache keys, resize and patchify): hashlib, numpy's
    copies and OpenCV release the GIL on buffers this size, and each group is independent. One
    pool per process: a forked child does not inherit its parent's threads."""
    return _pool_of(os.getpid())


@functools.cache
def _pool_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="edgejudge-frames")


def _chunks(items: list, parts: int) -> list[tuple[int, list]]:
    """(offset, chunk): `items` in at most `parts` contiguous chunks of near-equal length."""
    size = max(1, -(-len(items) // parts))
    return [(i, items[i:i + size]) for i in range(0, len(items), size)]


def _map_chunks(fn, items: list) -> list:
    """`fn` over `items` on the worker threads, one contiguous chunk per thread rather than one task
    per item: W1's 128 small tasks a decision (keys, then patches) contended for the GIL and took
    25-90 ms of host time on the H100 box for about 10 ms of work."""
    chunks = _workers().map(lambda chunk: [fn(item) for item in chunk[1]], _chunks(items, WORKERS))
    return [result for chunk in chunks for result in chunk]


def cache_copies(label_ids: list[np.ndarray]) -> int:
    """Copies of a prefilled prompt's KV cache that scoring `label_ids` makes: none for labels of
    one token (scored by the prompt's last logits) or when one label has more (the prefill
    carries it: `carried_tokens`), else one per label of more than one token."""
    fed = sum(len(ids) > 1 for ids in label_ids)
    return fed if fed > 1 else 0


def carried_tokens(label_ids: list[np.ndarray]) -> np.ndarray:
    """The tokens a prompt's prefill carries after it: all but the last of the one label of more
    than one token, when there is exactly one; else none (the others are fed after the prefill)."""
    fed = [ids for ids in label_ids if len(ids) > 1]
    return np.asarray(fed[0][:-1] if len(fed) == 1 else [], np.int64)


def log_sum_exp(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp)) over the last axis of float logits, in float64."""
    logits = np.asarray(logits, np.float32)
    # shifted by the row's max: exp in float32 (numpy's vectorized kernel), summed in float64:
    # within 1e-8 of doing it all in float64 on a 150k vocabulary (W1 on the H100 host: 2.0-2.2 ms
    # a decision, 3.2 all in float64). np.logaddexp.reduce walks the vocabulary one pair at a time
    # (40 ms).
    top = logits.max(axis=-1, keepdims=True)
    return top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64))


def mean_nll(logits: np.ndarray, label_ids: np.ndarray) -> float:
    """Mean NLL of `label_ids` given float logits at the positions that predict them."""
    rows = np.arange(len(label_ids))
    return float((log_sum_exp(logits) - np.asarray(logits, np.float32)[rows, label_ids]).mean())


class StageTimer:
    """Wall time per stage in ms, summed when a stage runs more than once."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - start) * 1e3


class VisionCache:
    """Vision-encoder outputs per 2-frame group, kept where the vision encoder ran (the GPU): a
    store of rows, per vision output one (capacity x rows per token, hidden) table (`tables`).

    A group's tokens take consecutive rows, written there by the vision run itself
    (`GroupedVisionGraph.run_into`), and the decoder's inputs are gathered from them
    (`TextDecoder.multimodal_embeds`): features never travel through the host. New groups take
    the rows after the last ones claimed, from row 0 again at the end (a ring); the groups whose
    rows they overwrite leave the cache, and beyond `max_groups` the least recently used leave too.

    Key: sha256 of the group's raw uint8 frames, their shape, and the target size. W1's 128
    frames of 224x224 on the H100 host (SHA-NI), 8 threads: sha256 2.5 ms, sha1 3.0, blake2b 8.1
    (2026-11-23). Measured with time.perf_counter on 64 frames (2 CPU cores): sha1 over the raw
    frames took 5.2 ms; keying on the preprocessed patch rows instead would preprocess every
    frame first (7.5 ms) and hash 4x the bytes (float32 rows: 20.6 ms). Raw keys also let a hit
    skip the resize and patchify, so only new groups are preprocessed (0.23 ms per group).
    """

    def __init__(self, max_groups: int):
        if max_groups < 0:
            raise InputError(f"the vision cache holds max_groups >= 0 groups, not {max_groups}")
        self.max_groups = max_groups
        self.entries: OrderedDict[tuple, tuple[int, int]] = OrderedDict()  # key -> (first row, tokens)
        self.tables: list = []  # OrtValues, one per vision output
        self.capacity = 0  # token rows the tables hold
        self.head = 0  # the row after the last claimed

    @staticmethod
    def key(frames: np.ndarray, size: tuple[int, int]) -> tuple:
        return hashlib.sha256(np.ascontiguousarray(frames)).digest(), frames.shape, size

    def get(self, key: tuple) -> tuple[int, int] | None:
        slot = self.entries.get(key)
        if slot is not None:
            self.entries.move_to_end(key)
        return slot

    def put(self, key: tuple, slot: tuple[int, int]) -> None:
        self.entries[key] = slot
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_groups:
            self.entries.popitem(last=False)

    def claim(self, rows: int, keep: list[tuple[int, int]]) -> int | None:
        """The first of `rows` consecutive rows for new groups, the groups on them dropped; None
        when they would overwrite a slot of `keep` (the groups the call reads from the store)."""
        start = self.head if self.head + rows <= self.capacity else 0
        end = start + rows
        if end > self.capacity or any(row < end and start < row + n for row, n in keep):
            return None
        for key, (row, n) in list(self.entries.items()):
            if row < end and start < row + n:
                del self.entries[key]
        self.head = end
        return start

    def reset(self, tables: list, capacity: int) -> None:
        """Empty, on new tables of `capacity` rows."""
        self.entries.clear()
        self.tables, self.capacity, self.head = tables, capacity, 0


@dataclass
class Prompt:
    """One prompt: its text side (`runtime.model.prompt_inputs`) and its sampled videos."""

    arrays: dict[str, np.ndarray]
    clips: list[Clip]

    @property
    def length(self) -> int:
        return self.arrays["input_ids"].shape[1]


class Engine:
    """An ONNX artifact's vision encoder, text decoder and LM head, with the vision-group cache."""

    def __init__(self, artifact_dir: str | Path, device: str = "cpu", gpu_mem_gb: float | None = None,
                 cache_groups: int = CACHE_GROUPS, hf: str | None = None, cuda_graph: bool = True,
                 prefill_graph: bool | None = None):
        """`cuda_graph`: on CUDA, capture greedy decoding's steps as CUDA graphs; `prefill_graph`
        the candidate-label prefill too, which then keeps its activations on the device (W1 int4
        on the H100, one call: 123.0 ms p50 at a 5.68 GiB peak, against 136.3 ms at 4.77 without).
        None: capture it when no memory cap is set (a cap says the memory matters more). With it
        captured, the vision session keeps its arena between calls too."""
        self.model = runtime_model.load(artifact_dir, hf=hf)  # checks the manifest's hashes
        providers = execution_providers(device, gpu_mem_gb)
        self.gpu_mem_gb = gpu_mem_gb
        self.weight_bytes = device_weight_bytes(self.model.path)
        check_gpu_memory(gpu_mem_gb, self.weight_bytes)
        self.decoder = TextDecoder(self.model.path, providers, cuda_graph=cuda_graph,
                                   prefill_graph=gpu_mem_gb is None if prefill_graph is None else prefill_graph)
        # With the prefill captured (no cap: speed first) the vision arena is kept between calls too:
        # W1 int4 on the H100, vision 28.7 ms against 31.1 handing it back, peak 5.85 GiB against 5.55
        self.vision = load_vision_encoder(self.model.path / VISION_NAME, self.model.family_name, providers,
                                          release_arena=not self.decoder.prefill_graph)
        if self.vision.output_type != self.decoder.dtype:
            raise InputError(f"{self.model.path}: the vision graph gives {np.dtype(self.vision.output_type).name}, "
                             f"the decoder takes {np.dtype(self.decoder.dtype).name}")
        self.cache = VisionCache(cache_groups)
        self._levels: dict[tuple[int, int], np.ndarray] = {}  # (h, w) grid -> reused patch-row buffer
        self.prompts: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()  # `prompt`'s text sides
        self.groups_encoded = 0  # vision-graph batch rows run so far (cache misses)
        self.eos_ids = eos_token_ids(self.model)
        self.repetition_penalty = float(generation_config(self.model).get("repetition_penalty") or 1.0)

    def prompt(self, clips: list[Clip], text: str, system: str | None = None) -> Prompt:
        """The prompt's text side depends on the clips' shapes, sampled indices and frame rates,
        not on their pixels: it is kept per such key, read-only (a control loop asks for the same
        prompt every decision; W1's two views took 4.7 ms of tokenization and positions a decision
        on the H100 host)."""
        key = (text, system, tuple((c.frames.shape, c.indices.tobytes(), c.fps, c.total_frames) for c in clips))
        arrays = self.prompts.get(key)
        if arrays is None:
            arrays = self.prompts[key] = runtime_model.prompt_inputs(self.model, clips, text, system)
            if len(self.prompts) > PROMPTS_KEPT:
                self.prompts.popitem(last=False)
        self.prompts.move_to_end(key)
        return Prompt(arrays, clips)

    def token_ids(self, text: str, what: str) -> np.ndarray:
        ids = self.model.prompter.encode(text)
        if not len(ids):
            raise InputError(f"{what} {text!r} tokenizes to nothing")
        return ids

    # -- vision -------------------------------------------------------------------------------------
    def visual(self, prompts: list[Prompt], timer: StageTimer) -> list[VisualRows]:
        """Per prompt, where its visual tokens' features (and DeepStack taps) are, in the
        processor's order of groups and tokens."""
        patch = self.model.vision.patch_size
        return self.encode_frames([[(clip.frames, (h * patch, w * patch))
                                    for clip, (_, h, w) in zip(p.clips, p.arrays["video_grid_thw"].tolist())]
                                   for p in prompts], timer)

    def encode_frames(self, requests: list[list[tuple[np.ndarray, tuple[int, int]]]], timer: StageTimer
                      ) -> list[VisualRows]:
        """`visual` for any frames: per request, its (frames (T, H, W, 3) uint8, target (height,
        width)) entries' visual rows, in order. An entry of one frame is an image (the frame fills
        its temporal patch, as HF's image processor does). Cached groups are not re-encoded; all
        new groups of one target size run as one batch, written into the store's rows."""
        pp = self.model.vision
        tp, patch, merge = pp.temporal_patch_size, pp.patch_size, self.vision.merge
        with timer("preprocess"):
            members = [(frames, start, size) for request in requests for frames, size in request
                       for start in range(0, len(frames), tp)]  # (source frames, first frame, size) per group
            keys = _map_chunks(lambda m: VisionCache.key(m[0][m[1]:m[1] + tp], m[2]), members)
            plans, at = [], 0
            for request in requests:
                count = sum(-(-len(frames) // tp) for frames, _ in request)
                plans.append(keys[at:at + count])
                at += count
            groups = dict(zip(keys, members))
            tokens = {key: (size[0] // patch) * (size[1] // patch) // merge**2 for key, (_, _, size) in groups.items()}
            if not self.cache.tables or sum(tokens.values()) > self.cache.capacity:
                self._new_store(sum(tokens.values()), max(tokens.values(), default=1))
            have = {key: slot for key in groups if (slot := self.cache.get(key)) is not None}
            new = [key for key in groups if key not in have]  # a group repeated within this call is encoded once
            start = self.cache.claim(sum(tokens[key] for key in new), list(have.values()))
            if start is None:  # the new rows would overwrite groups this call reads: encode all again
                self.cache.reset(self.cache.tables, self.cache.capacity)
                have, new = {}, list(groups)
                start = self.cache.claim(sum(tokens.values()), [])
            by_size: dict[tuple[int, int], list[tuple]] = {}
            for key in new:
                by_size.setdefault(groups[key][2], []).append(key)
            batches, row = [], start
            for (height, width), keys in by_size.items():
                patches = self._levels_buffer(len(keys), height // patch, width // patch)
                list(_workers().map(lambda chunk: self._levels_into(patches[chunk[0]:], [groups[k] for k in chunk[1]]),
                                    _chunks(keys, WORKERS)))
                batches.append((patches, height // patch, width // patch, row))
                for key in keys:
                    have[key] = (row, tokens[key])
                    row += tokens[key]
        with timer("vision"):
            for patches, h, w, first in batches:
                self.vision.run_into(patches, h, w, self.cache.tables, first)
                self.groups_encoded += len(patches)
            for key in new:
                self.cache.put(key, have[key])
        return [self._rows([have[key] for key in keys]) for keys in plans]

    def _levels_buffer(self, count: int, h: int, w: int) -> np.ndarray:
        """(count, h*w, patch_dim) uint8 patch rows for the vision graph, in a buffer kept per grid
        and reused while it is large enough: a fresh 19 MB array per W1 decision is page faults
        that the worker threads take one at a time."""
        shape = (count, h * w, self.model.vision.patch_dim)
        buffer = self._levels.get((h, w))
        if buffer is None or len(buffer) < count:
            buffer = self._levels[(h, w)] = np.empty(shape, np.uint8)
            if self.vision.device[0] == "cuda":  # uploaded every call: by DMA from pinned pages
                pin_host_memory(buffer)
        return buffer[:count]

    def _levels_into(self, out: np.ndarray, members: list[tuple[np.ndarray, int, tuple[int, int]]]) -> None:
        """The uint8 patch rows of groups (source frames, first frame, size) into `out`, one call per
        run of consecutive groups of one source: fewer, longer numpy and OpenCV calls (a run ends
        at a clip's end, where a short last group is padded as HF pads it)."""
        pp = self.model.vision
        tp, first = pp.temporal_patch_size, 0
        while first < len(members):
            source, start, size = members[first]
            end = first + 1
            while end < len(members) and members[end][0] is source and members[end][1] == members[end - 1][1] + tp:
                end += 1
            preprocess_video_levels(source[start:members[end - 1][1] + tp], size, pp,
                                    out=out[first:end].reshape(-1, pp.patch_dim))
            first = end

    def _new_store(self, rows: int, tokens_per_group: int) -> None:
        """Tables for at least `rows` token rows and room for the cache's `max_groups` groups of
        `tokens_per_group` tokens, on the vision session's device (the old ones freed first)."""
        import onnxruntime as ort

        capacity = max(rows, self.cache.max_groups * tokens_per_group, 1)
        self.cache.reset([], 0)
        tables = [ort.OrtValue.ortvalue_from_shape_and_type([capacity * self.vision.rows_per_token(k),
                                                             self.vision.out_hidden], self.vision.output_type,
                                                            *self.vision.device)
                  for k in range(len(self.vision.outputs))]
        self.cache.reset(tables, capacity)

    def _rows(self, slots: list[tuple[int, int]]) -> VisualRows:
        """The visual rows of groups at `slots` ((first row, tokens) each), in order. A DeepStack
        group's block holds its taps one after another: tap i, token t at taps * row + i * tokens + t."""
        features = np.concatenate([np.arange(row, row + n) for row, n in slots]) if slots else np.zeros(0, np.int64)
        names = [name for name, _ in self.vision.outputs]
        if "deepstack" not in names:
            return VisualRows(self.cache.tables[0], features)
        k = names.index("deepstack")
        taps = self.vision.rows_per_token(k)
        tap_rows = np.concatenate([taps * row + np.arange(taps)[:, None] * n + np.arange(n) for row, n in slots],
                                  axis=1) if slots else np.zeros((taps, 0), np.int64)
        return VisualRows(self.cache.tables[0], features, self.cache.tables[k], tap_rows)

    # -- decoder ------------------------------------------------------------------------------------
    def check_memory(self, rows: int, tokens: int) -> None:
        """Refuse a request whose KV cache (`rows` sequences of `tokens`) would not fit the GPU cap."""
        check_gpu_memory(self.gpu_mem_gb, self.weight_bytes, self.decoder.kv_cache_bytes(rows, tokens),
                         f" for {rows} x {tokens} tokens")

    def prefill(self, prompts: list[Prompt], visual: list[VisualRows], capacity: int | None,
                carried: np.ndarray = np.zeros(0, np.int64), keep_cache: bool = True):
        """Prompts of one length as one batch, each followed by the `carried` tokens, from an empty
        cache with room for `capacity` tokens (None: just these; `keep_cache=False`: none kept,
        `TextDecoder.prefill`): the (B, S, hidden) hidden states as an OrtValue on the device."""
        ids, positions = zip(*(label_positions(p.arrays, carried) for p in prompts))
        ids = np.concatenate(ids)
        # a prefill that keeps no cache reads its inputs from its bound buffers: spliced there
        out = None if keep_cache else self.decoder.fixed_prefill(*ids.shape).inputs
        embeds, deepstack = self.decoder.multimodal_embeds(ids, self.model.video_token_id, VisualRows.join(visual), out)
        cos, sin = self.decoder.cos_sin(np.concatenate(positions, axis=1))
        return self.decoder.prefill(embeds, cos, sin, deepstack, capacity=capacity, on_device=True,
                                    keep_cache=keep_cache)

    def score_labels(self, prompts: list[Prompt], labels: tuple[str, ...], timer: StageTimer | None = None
                     ) -> np.ndarray:
        """(prompts, labels) mean NLL per label token. Prompts of the same length share one batch."""
        timer = timer or StageTimer()
        label_ids = [self.token_ids(label, "label") for label in labels]
        width = max(len(ids) for ids in label_ids) - 1  # label tokens after the prompt
        copies, carried = cache_copies(label_ids), carried_tokens(label_ids)
        fed_after = width > len(carried)  # label tokens fed on the prefilled cache need room in it
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_length.setdefault(prompt.length, []).append(i)
        for length, rows in by_length.items():  # at the peak: the prefill's cache and its copies
            self.check_memory(len(rows) * (1 + copies), length + width)
        visual = self.visual(prompts, timer)
        scores = np.empty((len(prompts), len(labels)))
        for length, rows in by_length.items():
            with timer("prefill"):
                hidden = self.prefill([prompts[i] for i in rows], [visual[i] for i in rows],
                                      length + width if fed_after else None, carried, keep_cache=fed_after)
            with timer("scoring"):
                scores[rows] = self._score_batch(hidden, [prompts[i] for i in rows], label_ids, carried)
        return scores

    def _score_batch(self, hidden, prompts: list[Prompt], label_ids: list[np.ndarray], carried: np.ndarray
                     ) -> np.ndarray:
        """Score every label after each prefilled prompt row (`hidden` the prefill's OrtValue, the
        `carried` tokens after each prompt). A label's first token is scored by the prompt's last
        logits. The labels of more than one token ("fed") are scored where the prefill carried
        them or else run as one batch on the cache, repeated once per fed label when there are
        several (row b * F + f = prompt b, fed label f), every one of their tokens but the last
        fed to all rows at once. The LM head reads the hidden states on the device."""
        batch, length = len(prompts), prompts[0].length
        fed = [l for l, ids in enumerate(label_ids) if len(ids) > 1]
        width = max(len(ids) for ids in label_ids) - 1
        read = self.decoder.logits(hidden, slice(length - 1, None))  # the prompt's last position, then carried
        first, rest = read[:, 0], read[:, 1:]  # rest: the fed labels' positions, here when carried
        if fed and not len(carried):
            rest = np.empty((batch * len(fed), width, self.decoder.vocab_size), np.float32)
            tokens = np.zeros((len(fed), width), np.int64)  # padding: any token, after the label
            for f, l in enumerate(fed):
                tokens[f, :len(label_ids[l]) - 1] = label_ids[l][:-1]
            tokens = np.tile(tokens, (batch, 1))
            if cache_copies(label_ids):
                self.decoder.repeat_cache(len(fed))
            deltas = np.repeat(np.concatenate([p.arrays["rope_deltas"] for p in prompts]), len(fed), axis=0)
            # ORT's GroupQueryAttention extends a cache by several tokens only for batch 1, so the
            # rows advance one token per step: one step for labels of up to two tokens.
            for j in range(width):
                cos, sin = self.decoder.cos_sin(decode_position_ids(length + j, 1, deltas, batch * len(fed)))
                step = self.decoder.step(self.decoder.embed(tokens[:, j:j + 1]), cos, sin, on_device=True)
                rest[:, j] = self.decoder.logits(step)[:, 0]
        # each position's log-sum-exp once, whichever labels read it (W1: 4 rows, not 6)
        first_lse, rest_lse = log_sum_exp(first), log_sum_exp(rest)
        scores = np.empty((batch, len(label_ids)))
        for b in range(batch):
            for l, ids in enumerate(label_ids):
                nll = [first_lse[b] - first[b, ids[0]]]
                if l in fed:  # its tokens after the first; the padding positions are not read
                    row, after = b * len(fed) + fed.index(l), np.arange(len(ids) - 1)
                    nll.extend(rest_lse[row, after] - rest[row, after, ids[1:]])
                scores[b, l] = np.mean(nll)
        return scores

    def generate(self, prompt: Prompt, max_new_tokens: int, score_prefix: str | None = None,
                 timer: StageTimer | None = None) -> tuple[list[int], np.ndarray | None]:
        """Greedy tokens after the prompt (up to `max_new_tokens`, stopping after an EOS), and
        with `score_prefix` the probabilities of the digits 1-5 right after prompt + prefix
        (a softmax over those five logits)."""
        timer = timer or StageTimer()
        # the cache holds the prompt, then either the score prefix or the greedy tokens
        prefix_length = len(self.token_ids(score_prefix, "score prefix")) if score_prefix else 0
        capacity = prompt.length + max(max_new_tokens - 1, prefix_length)
        self.check_memory(1, capacity)
        visual = self.visual([prompt], timer)
        with timer("prefill"):
            hidden = self.prefill([prompt], visual, capacity)
            first = self.decoder.logits(hidden, slice(-1, None))[0, -1]
        digits = None
        if score_prefix:
            with timer("distribution"):
                digits = self._digit_distribution(prompt, score_prefix)
        with timer("decode"):
            tokens = self.decoder.greedy(first, prompt.length, prompt.arrays["rope_deltas"], max_new_tokens,
                                         sorted(self.eos_ids), repetition_penalty=self.repetition_penalty,
                                         context_ids=prompt.arrays["input_ids"])
        return tokens, digits

    def generate_many(self, clips: list[Clip], texts: list[str], max_new_tokens: int, system: str | None = None,
                      score_prefixes: list[str] | None = None, timer: StageTimer | None = None
                      ) -> list[tuple[list[int], np.ndarray | None]]:
        """`generate` for several texts about the same videos. On ONNX Runtime each text is its
        own prefill for now (the vision groups come from the cache after the first); the shared
        prefill of a rubric is the torch backend's (`edgejudge.torch_backend`)."""
        prefixes = score_prefixes or [None] * len(texts)
        return [self.generate(self.prompt(clips, text, system), max_new_tokens, prefix, timer)
                for text, prefix in zip(texts, prefixes)]

    def _digit_distribution(self, prompt: Prompt, prefix: str) -> np.ndarray:
        """One step over the prefix on the prefilled prompt, then the cache is put back to the
        prompt (`TextDecoder.restore`: the prefix's rows are ignored and overwritten by greedy)."""
        digits = digit_token_ids(self.model.prompter)
        prefix_ids = self.token_ids(prefix, "score prefix")
        saved = self.decoder.snapshot()
        cos, sin = self.decoder.cos_sin(decode_position_ids(prompt.length, len(prefix_ids), prompt.arrays["rope_deltas"]))
        hidden = self.decoder.step(self.decoder.embed(prefix_ids[None]), cos, sin, on_device=True)
        self.decoder.restore(saved)
        return digit_probabilities(self.decoder.logits(hidden, slice(-1, None))[0, -1, digits])
