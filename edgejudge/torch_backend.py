"""The runtime's second backend: bnb artifacts and plain HF model folders on torch + transformers.

`TorchEngine` has the ONNX `Engine`'s interface (`prompt`, `token_ids`, `score_labels`, `generate`,
`model`, `eos_ids`) on HF's own forward, so `Judge` runs on either. The inputs are the runtime's
(`edgejudge.runtime.model`: HF's processor arrays, position ids included), so both backends see
exactly the same tokens. `generate_many` adds the whole rubric on one video prefill.

Label scoring, and every prefill of a deepstack model, runs on transformers' DynamicCache. For
Qwen3.5 it holds, besides the key/value tensors of the full-attention layers, the conv and
recurrent states of the Gated DeltaNet layers.
transformers 5.17's `Cache.batch_repeat_interleave` does not reach those (its LinearAttentionLayer
has no such method), so rows are branched with `reorder_cache`, which every layer kind implements.
Greedy decoding starts from a prompt prefilled on a one-row StaticCache (`PromptRows`) and continues
on a StaticCache of its rows (`StepRows`); on a GPU both run their forwards as CUDA graphs.

Exactness rules that shape the code:
- Right padding is exact for reading logits (causal: a pad only affects positions after it), so
  label scoring runs padded batches on a copy of the cache, then drops it.
- A cache that decoding continues from must never have seen a pad token: a DeltaNet state decays
  on a pad even when its input is zeroed. Continuations of unequal length therefore share one
  forward only for their common length; after it every row takes one token a step, its own.

Imports torch and transformers (bitsandbytes through transformers for bnb artifacts), never peft
or the export stack.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from edgejudge.errors import InputError
from edgejudge.manifest import MANIFEST_NAME, read_manifest
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.engine import Prompt, StageTimer, digit_probabilities, digit_token_ids, eos_token_ids
from edgejudge.runtime.preprocess import normalize_table, preprocess_video_levels
from edgejudge.runtime.video import Clip

GIB = 1 << 30
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Room over weights + cache for a forward's transient buffers and the allocator's slack.
WORKING_ROOM = 1.2
ROWS_ROOM = 256  # decode rows' cache length is a multiple of this, so that nearby lengths share them


# -- memory ------------------------------------------------------------------------------------
def weight_bytes(folder: Path, float_bytes: int | None) -> int:
    """Bytes the weights take once loaded, from the safetensors headers (no tensor is read).

    Float tensors count at `float_bytes` (the dtype they load in) when given; bnb's quantized
    tensors (uint8 data, absmax, ...) and everything else at their stored size.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        why = f" (found {', '.join(bins)}: pickle files are never loaded)" if bins else ""
        raise InputError(f"{folder}: no .safetensors weights{why}")
    total = 0
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    dtype, numel = piece.get_dtype(), int(np.prod(piece.get_shape()))
                    floating = dtype in ("F32", "F16", "BF16")
                    total += numel * (float_bytes if float_bytes and floating else DTYPE_BYTES.get(dtype, 4))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    return total


def cache_bytes(text_config: dict, batch: int, length: int, float_bytes: int) -> int:
    """Bytes of a cache of `batch` rows of `length` tokens: keys and values of the full-attention
    layers; conv states and (fp32) recurrent states of the linear-attention layers."""
    layers = int(text_config["num_hidden_layers"])
    types = text_config.get("layer_types") or ["full_attention"] * layers
    head_dim = int(text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"])
    per_full = 2 * batch * int(text_config["num_key_value_heads"]) * length * head_dim * float_bytes
    total = per_full * types.count("full_attention")
    if "linear_attention" in types:
        k_head, k_heads = int(text_config["linear_key_head_dim"]), int(text_config["linear_num_key_heads"])
        v_head, v_heads = int(text_config["linear_value_head_dim"]), int(text_config["linear_num_value_heads"])
        conv = batch * (2 * k_head * k_heads + v_head * v_heads) * int(text_config["linear_conv_kernel_dim"]) * float_bytes
        recurrent = batch * v_heads * k_head * v_head * 4
        total += (conv + recurrent) * types.count("linear_attention")
    return total


# -- attention ---------------------------------------------------------------------------------
GROUPED_SDPA = "edgejudge_grouped_sdpa"


def grouped_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """HF's sdpa attention, except where a mask meets grouped-query heads: HF then repeats the
    keys and values once per query head (`repeat_kv`), a copy of the whole cache in every layer
    of every step. Here the query heads that share a key head become more query rows of it
    instead (their masks repeated alike), which is the same attention without the copy."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, length, dim = query.shape
    rows = query.reshape(batch, key.shape[1], groups * length, dim)  # query head h reads key head h // groups
    out = torch.nn.functional.scaled_dot_product_attention(
        rows, key, value, attn_mask=attention_mask.repeat(1, 1, groups, 1), dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def use_grouped_sdpa(net) -> None:
    """Register `grouped_sdpa` with transformers and switch a language model on HF's sdpa to it
    (the vision tower keeps its own attention)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)
    if net.model.language_model.config._attn_implementation == "sdpa":
        net.set_attn_implementation({"text_config": GROUPED_SDPA})


# -- cache rows --------------------------------------------------------------------------------
def _copy_layer(layer):
    """A shallow copy of a cache layer with its own state dicts (conv/recurrent states by index)."""
    layer = copy.copy(layer)
    layer.__dict__.update({k: dict(v) for k, v in layer.__dict__.items() if isinstance(v, dict)})
    return layer


def select_rows(cache, rows: torch.Tensor):
    """A new cache whose row i is `cache`'s row rows[i]; `cache` keeps its own tensors.

    Every layer kind implements `reorder_cache` as an index_select, which allocates new tensors,
    so in-place updates of the copy (the conv/recurrent states are updated in place) never reach
    the source.
    """
    out = copy.copy(cache)
    out.layers = [_copy_layer(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.reorder_cache(rows)
    return out


# -- one video, many questions -----------------------------------------------------------------
def shared_prompt(prompts: list[dict[str, np.ndarray]]) -> tuple[int, list[np.ndarray]]:
    """Where the prompts of several texts on the same videos stop sharing tokens: the prefix
    length, and each prompt's own suffix ids.

    The split is the longest common run of the prompts' own ids (each tokenized alone, as
    `prompt_inputs` does), so it always falls on a token boundary identical in all of them: a
    tokenizer merge across the place where the texts start to differ is never cut. Every suffix
    keeps at least one token (its logits start the answer). A suffix continues at index + rope
    delta, which is checked against each prompt's own positions.
    """
    ids = [p["input_ids"][0] for p in prompts]
    shortest = min(len(i) for i in ids)
    differs = (np.stack([i[: shortest - 1] for i in ids]) != ids[0][: shortest - 1]).any(axis=0)
    cut = int(differs.argmax()) if differs.any() else shortest - 1
    for p in prompts:
        positions, delta, length = p["position_ids"], int(p["rope_deltas"].reshape(-1)[0]), p["input_ids"].shape[1]
        if not np.array_equal(positions[:, :, :cut], prompts[0]["position_ids"][:, :, :cut]):
            raise InputError("the prompts' positions differ inside their shared tokens (different videos?)")
        if not (positions[:, 0, cut:] == np.arange(cut, length) + delta).all():
            raise InputError("the texts' tokens do not all come after the videos: no shared video prefix")
    return cut, [i[cut:] for i in ids]


# -- the engine --------------------------------------------------------------------------------
@dataclass
class Prefix:
    """Prefilled prompts of one length: the cache and what scoring or decoding continues from."""

    cache: object  # a transformers Cache of `batch` rows of `length` tokens
    length: int
    rope_deltas: torch.Tensor  # (batch, 1): a text token at index i sits at position i + delta
    last_logits: torch.Tensor  # (batch, vocab) float32, predicted by each prompt's last token

    @property
    def batch(self) -> int:
        return self.rope_deltas.shape[0]


class TorchEngine:
    """A bnb artifact or HF model folder on torch, with the ONNX Engine's interface."""

    def __init__(self, folder: str | Path, device: str = "cpu", gpu_mem_gb: float | None = None,
                 hf: str | None = None, dtype: torch.dtype | None = None):
        """`dtype`: the float weights' dtype of a plain folder (default fp32 on CPU, bf16 on CUDA);
        a bnb artifact keeps the dtypes it was exported with. With `gpu_mem_gb` the weights are
        sized from the safetensors headers before anything loads and refused if over the cap, each
        request is sized before it runs, and on CUDA the cap is this process's memory fraction."""
        from transformers import AutoModelForImageTextToText

        folder = Path(folder)
        name, _, index = device.partition(":")
        if device != "cpu" and (name != "cuda" or (index and not index.isdigit())):
            raise InputError(f"device {device!r}: expected cpu, cuda or cuda:N")
        if gpu_mem_gb is not None and not (name == "cuda" and gpu_mem_gb > 0):
            raise InputError(f"gpu_mem_gb must be positive, got {gpu_mem_gb}" if name == "cuda"
                             else "gpu_mem_gb applies to device 'cuda' only")
        self.model = runtime_model.load(folder, hf=hf)  # checks an artifact's files against its manifest
        if (folder / MANIFEST_NAME).is_file() and (fmt := read_manifest(folder).format) != "bnb":
            raise InputError(f"{folder} is a {fmt} artifact; the torch backend runs bnb artifacts and HF model folders")
        self.text_config = self.model.config.get("text_config", self.model.config)
        if dtype is None and "quantization_config" not in self.model.config:
            dtype = torch.bfloat16 if name == "cuda" else torch.float32
        # bnb artifacts keep the dtype they were saved in: their compute and cache dtype
        saved = getattr(torch, self.model.config.get("dtype") or self.text_config.get("dtype") or "float32")
        self.float_bytes = torch.finfo(dtype or saved).bits // 8
        self.weights_bytes = weight_bytes(folder, self.float_bytes if dtype is not None else None)
        self.gpu_mem_gb = gpu_mem_gb
        self.cap_bytes = None if gpu_mem_gb is None else int(gpu_mem_gb * GIB)
        self.rows: StepRows | None = None  # decode's rows, kept for the next request of their shape
        self.prompt_rows: PromptRows | None = None  # the last decoded prompt's prefill, kept likewise
        self.check_fits(0, 0)  # the weights alone, before any is read
        if self.cap_bytes is not None:
            device_index = torch.device(device).index or 0
            fraction = self.cap_bytes / torch.cuda.get_device_properties(device_index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, fraction), device_index)
        try:
            self.net = AutoModelForImageTextToText.from_pretrained(
                folder, device_map=device, use_safetensors=True, trust_remote_code=False,
                **({"dtype": dtype} if dtype is not None else {})).eval()
        except torch.OutOfMemoryError:
            raise InputError(f"{folder}: out of GPU memory while loading the weights") from None
        use_grouped_sdpa(self.net)
        # Qwen3-VL adds visual features inside its first decoder layers (deepstack): its language
        # model needs more than the prompt's embeddings, so its prompts prefill as one HF forward.
        self.deepstack = bool(getattr(self.net.config.vision_config, "deepstack_visual_indexes", None))
        self.vision_inputs: tuple[bytes, dict] | None = None  # the last video grid's, see `video_features`
        self.device = torch.device(device)
        self.eos_ids = eos_token_ids(self.model)
        self.cuda_graphs = True  # decode's forwards replayed as CUDA graphs on a CUDA device

    # -- the Engine interface -----------------------------------------------------------------
    def prompt(self, clips: list[Clip], text: str, system: str | None = None) -> Prompt:
        return Prompt(runtime_model.build_inputs(self.model, clips, text, system), clips)

    def token_ids(self, text: str, what: str) -> np.ndarray:
        ids = self.model.prompter.encode(text)
        if not len(ids):
            raise InputError(f"{what} {text!r} tokenizes to nothing")
        return ids

    def score_labels(self, prompts: list[Prompt], labels: tuple[str, ...], timer: StageTimer | None = None
                     ) -> np.ndarray:
        """(prompts, labels) mean NLL per label token. Prompts of one length (the views of one
        decision) share one prefill; all their (prompt, label) pairs then run as one batch."""
        timer = timer or StageTimer()
        label_ids = [self.token_ids(label, "label") for label in labels]
        scores = np.empty((len(prompts), len(labels)))
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_length.setdefault(prompt.length, []).append(i)
        for rows in by_length.values():
            with timer("prefill"):
                prefix = self.prefill([prompts[i].arrays for i in rows])
            with timer("scoring"):
                scores[rows] = self.label_nlls(prefix, label_ids)
        return scores

    def generate(self, prompt: Prompt, max_new_tokens: int, score_prefix: str | None = None,
                 timer: StageTimer | None = None) -> tuple[list[int], np.ndarray | None]:
        """Greedy tokens after the prompt (up to `max_new_tokens`, stopping after an EOS), and with
        `score_prefix` the probabilities of the digits 1-5 right after prompt + prefix."""
        timer = timer or StageTimer()
        with timer("prefill"):
            prefix = self.prefill_one(prompt.arrays)
        with timer("decode"):
            return self.answers(prefix, [np.zeros(0, np.int64)], max_new_tokens,
                                None if score_prefix is None else [score_prefix])[0]

    def generate_many(self, clips: list[Clip], texts: list[str], max_new_tokens: int, system: str | None = None,
                      score_prefixes: list[str] | None = None, timer: StageTimer | None = None
                      ) -> list[tuple[list[int], np.ndarray | None]]:
        """`generate` for several texts about the same videos (a rubric's axes), with the videos
        preprocessed, encoded and prefilled once.

        The system prompt and videos come before each text, so the tokens they share are one
        prefill (the full-attention KV cache and the linear-attention states); all texts, and
        their score-prefix reads, then continue from it as one batch (`answers`).
        """
        timer = timer or StageTimer()
        if score_prefixes is not None and len(score_prefixes) != len(texts):
            raise InputError(f"{len(score_prefixes)} score prefixes for {len(texts)} texts")
        prefix, suffixes = self.prefill_shared(clips, texts, system, timer)
        with timer("decode"):
            return self.answers(prefix, suffixes, max_new_tokens, score_prefixes)

    # -- operations ---------------------------------------------------------------------------
    def prefill_shared(self, clips: list[Clip], texts: list[str], system: str | None = None,
                       timer: StageTimer | None = None) -> tuple[Prefix, list[np.ndarray]]:
        """Prefill the tokens that the prompts of several texts about the same videos share (the
        videos preprocessed once); returns that prefix and each text's own suffix ids."""
        timer = timer or StageTimer()
        if not texts:
            raise InputError("no texts to ask")
        with timer("preprocess"):
            prompts = runtime_model.prompt_inputs_many(self.model, clips, texts, system)
            cut, suffixes = shared_prompt(prompts)
            arrays = {k: v[..., :cut] if k in ("input_ids", "attention_mask", "position_ids") else v
                      for k, v in prompts[0].items()}
            arrays["pixel_levels_videos"] = self._levels(clips, arrays["video_grid_thw"])
        with timer("prefill"):
            return self.prefill_one(arrays), suffixes

    def _levels(self, clips: list[Clip], grids: np.ndarray) -> np.ndarray:
        """The clips' uint8 patch rows at their grids' sizes (`patch_levels`), to be normalized
        on the device (`pixel_values`): a quarter of the bytes of `pixel_values_videos` to upload,
        and no float pass on the host."""
        vision = self.model.vision
        levels = np.empty((int(np.prod(grids, axis=1).sum()), vision.patch_dim), np.uint8)
        row = 0
        for clip, (t, h, w) in zip(clips, grids.tolist()):
            preprocess_video_levels(clip.frames, (h * vision.patch_size, w * vision.patch_size), vision,
                                    out=levels[row : row + t * h * w])
            row += t * h * w
        return levels

    def pixel_values(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """`pixel_values_videos` on the device in the vision tower's dtype: given, or looked up
        from `pixel_levels_videos` in the processor's table of normalized levels (a gather, so the
        values are the host's float32 ones, cast once as before)."""
        if "pixel_values_videos" in arrays:
            return torch.from_numpy(arrays["pixel_values_videos"]).to(self.device).to(self.net.dtype)
        table = torch.from_numpy(normalize_table(self.model.vision)).to(self.device).to(self.net.dtype)
        levels = torch.from_numpy(arrays["pixel_levels_videos"]).to(self.device).long()
        per_channel = levels.shape[1] // len(table)
        return torch.cat([table[c][levels[:, c * per_channel : (c + 1) * per_channel]] for c in range(len(table))], 1)

    def check_fits(self, batch: int, length: int) -> None:
        """Refuse a request whose cache of `batch` x `length` tokens, with the weights and the
        prompt and decode rows kept from an earlier request, would not fit the memory cap (with
        batch 0: the weights alone)."""
        if self.cap_bytes is None:
            return
        kept = sum(cache_bytes(self.text_config, rows.batch, rows.length, self.float_bytes)
                   for rows in (self.rows, self.prompt_rows) if rows)
        need = (self.weights_bytes + kept + cache_bytes(self.text_config, batch, length, self.float_bytes)) * WORKING_ROOM
        if need > self.cap_bytes:
            what = f"{batch} x {length} tokens need" if batch else "the weights need"
            raise InputError(f"{self.model.path}: {what} about {need / GIB:.3g} GiB with working room, over the GPU "
                             f"memory cap of {self.cap_bytes / GIB:.3g} GiB")

    def _hidden(self, cache, ids: torch.Tensor | None, positions: torch.Tensor, attention_mask=None,
                embeds: torch.Tensor | None = None, **vision) -> torch.Tensor:
        """Final-norm hidden states (B, S, hidden) of `ids` (or of their `embeds`) appended to
        `cache` (updated in place)."""
        try:
            return self.net.model(input_ids=ids, inputs_embeds=embeds, position_ids=positions,
                                  attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                                  **vision).last_hidden_state
        except torch.OutOfMemoryError:
            batch, length = (ids if ids is not None else embeds).shape[:2]
            raise InputError(f"out of GPU memory for {batch} x {length} tokens after "
                             f"{cache.get_seq_length()} cached") from None

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net.lm_head(hidden).float()

    def _positions(self, start: torch.Tensor, count: int, deltas: torch.Tensor) -> torch.Tensor:
        """(3, B, count) positions of text tokens at sequence indices start[b] .. start[b] + count - 1."""
        index = start.view(-1, 1) + torch.arange(count, device=self.device).view(1, -1)
        return (index + deltas.view(-1, 1)).unsqueeze(0).expand(3, -1, -1)

    @torch.no_grad()
    def prefill(self, prompts: list[dict[str, np.ndarray]]) -> Prefix:
        """Prompts of one token count (with their videos) as one batch, from an empty cache."""
        from transformers import DynamicCache

        if len({p["input_ids"].shape[1] for p in prompts}) != 1:
            raise InputError("prompts of different lengths cannot share one prefill batch")
        length = prompts[0]["input_ids"].shape[1]
        self.check_fits(len(prompts), length)

        def stack(key: str, axis: int = 0) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([p[key] for p in prompts], axis=axis)).to(self.device)

        cache = DynamicCache(config=self.net.config)
        pixels = [self.pixel_values(p) for p in prompts]
        hidden = self._hidden(cache, stack("input_ids"), stack("position_ids", axis=1),
                              pixel_values_videos=pixels[0] if len(pixels) == 1 else torch.cat(pixels),
                              video_grid_thw=stack("video_grid_thw"))
        prefix = Prefix(cache, length, stack("rope_deltas").view(-1, 1), self._logits(hidden[:, -1]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the stage timers measure the work, not its launch
        return prefix

    @torch.no_grad()
    def prefill_one(self, arrays: dict[str, np.ndarray]) -> Prefix:
        """One prompt prefilled for decoding to continue from: its videos encoded and their features
        put in the prompt's embeddings, then the language model over those on the one-row static
        cache of `PromptRows` (a CUDA graph per prompt length on a GPU: a 9B model's eager forward
        spends more time launching kernels than running them). The prefix holds until the next
        call. Deepstack models prefill as one HF forward (`prefill`)."""
        if self.deepstack:
            return self.prefill([arrays])
        length = arrays["input_ids"].shape[1]
        if self.prompt_rows is not None and self.prompt_rows.length != length:
            self.prompt_rows = None  # no reference left: freed before the new ones are allocated
        if self.prompt_rows is None:
            self.check_fits(1, length)
        embeds = self.embeddings(arrays)
        if self.prompt_rows is None:
            self.prompt_rows = PromptRows(self, length)
        positions = torch.from_numpy(arrays["position_ids"]).to(self.device)
        logits = self.prompt_rows.run(embeds, positions)
        prefix = Prefix(self.prompt_rows.cache, length,
                        torch.from_numpy(arrays["rope_deltas"]).to(self.device).view(-1, 1), logits.clone())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the stage timers measure the work, not its launch
        return prefix

    def embeddings(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """(1, length, hidden) embeddings of one prompt's tokens, its videos' features in their
        placeholders, in order (what HF's forward does with `masked_scatter`)."""
        ids = arrays["input_ids"][0]
        embeds = self.net.model.get_input_embeddings()(torch.from_numpy(ids).to(self.device)[None])
        if "video_grid_thw" not in arrays:
            return embeds
        features = self.video_features(arrays)
        slots = np.flatnonzero(ids == self.model.video_token_id)
        if len(slots) != len(features):
            raise InputError(f"the prompt has {len(slots)} video tokens for {len(features)} video features")
        embeds[0, torch.from_numpy(slots).to(self.device)] = features.to(embeds.dtype)
        return embeds

    def video_features(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """The vision tower's merged features of a prompt's videos, one row per video token.

        The tower's per-frame attention bounds (`cu_seqlens`) are given on the host and its rotary
        position ids precomputed once per grid: HF would derive them on the device and read them
        back in every block, a device sync each time (transformers' vision_utils takes both
        precomputed; the values are its own). A rubric's videos of one size reuse them."""
        from transformers import vision_utils

        grids = arrays["video_grid_thw"]
        grid = torch.from_numpy(grids).to(self.device)
        if self.vision_inputs is None or self.vision_inputs[0] != grids.tobytes():
            self.vision_inputs = grids.tobytes(), {
                "cu_seqlens": vision_utils.get_vision_cu_seqlens(torch.from_numpy(grids)),
                "position_ids": vision_utils.get_vision_position_ids(grid, self.net.model.visual.spatial_merge_size)}
        out = self.net.model.get_video_features(self.pixel_values(arrays), grid, return_dict=True,
                                                **self.vision_inputs[1])
        return torch.cat(out.pooler_output)

    @torch.no_grad()
    def continuation_logits(self, prefix: Prefix, rows: list[int], continuations: list[np.ndarray],
                            ) -> list[torch.Tensor]:
        """For continuation i of prefix row rows[i]: float32 logits (len_i + 1, vocab), predicted
        by the prompt's last token and then by each continuation token.

        One right-padded batch on a copy of the cache: exact for every real token (a pad only
        affects positions after it), and the padded copy is dropped.
        """
        first = prefix.last_logits[rows]
        width = max(len(c) for c in continuations)
        if width == 0:
            return [first[i : i + 1] for i in range(len(rows))]
        self.check_fits(prefix.batch + len(rows), prefix.length + width)  # the prefix and its padded copy
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, c in enumerate(continuations):
            ids[i, : len(c)] = torch.from_numpy(np.asarray(c, np.int64))
        index = torch.tensor(rows, device=self.device)
        start = torch.full((len(rows),), prefix.length, device=self.device)
        hidden = self._hidden(select_rows(prefix.cache, index), ids.to(self.device),
                              self._positions(start, width, prefix.rope_deltas[index]))
        return [torch.cat([first[i : i + 1], self._logits(hidden[i, : len(c)])]) for i, c in enumerate(continuations)]

    def label_nlls(self, prefix: Prefix, label_ids: list[np.ndarray]) -> np.ndarray:
        """(prefix rows, labels) mean NLL per label token; every (row, label) pair in one batch,
        each fed its label but the last token."""
        pairs = [(row, i) for row in range(prefix.batch) for i in range(len(label_ids))]
        logits = self.continuation_logits(prefix, [r for r, _ in pairs], [label_ids[i][:-1] for _, i in pairs])
        nlls = np.empty((prefix.batch, len(label_ids)))
        for (row, i), table in zip(pairs, logits):
            logp = table.double().log_softmax(-1).cpu().numpy()
            nlls[row, i] = -logp[np.arange(len(label_ids[i])), label_ids[i]].mean()
        return nlls

    def answers(self, prefix: Prefix, suffixes: list[np.ndarray], max_new_tokens: int,
                score_prefixes: list[str] | None = None) -> list[tuple[list[int], np.ndarray | None]]:
        """Per suffix after prefix row 0: its greedy tokens, and with `score_prefixes` the digit
        distribution after suffix + score prefix. The score reads are rows of the same batch
        that feed the prefix after their suffix and generate nothing."""
        if not score_prefixes:
            return [(tokens, None) for tokens in self.decode(prefix, suffixes, max_new_tokens)]
        digit_ids = digit_token_ids(self.model.prompter)
        forced = [np.concatenate([s, self.token_ids(p, "score prefix")]) for s, p in zip(suffixes, score_prefixes)]
        fed: list[torch.Tensor] = []
        tokens = self.decode(prefix, [*suffixes, *forced], [max_new_tokens] * len(suffixes) + [0] * len(forced), fed=fed)
        digit_logits = torch.stack(fed[len(suffixes):])[:, digit_ids].cpu().numpy()  # the five columns only
        return list(zip(tokens[: len(suffixes)], map(digit_probabilities, digit_logits)))

    @torch.no_grad()
    def decode(self, prefix: Prefix, feeds: list[np.ndarray], max_new_tokens: int | list[int],
               step_logits: list[list[torch.Tensor]] | None = None, fed: list[torch.Tensor] | None = None
               ) -> list[list[int]]:
        """Greedy tokens of prefix row 0 continued by each feed, all rows as one batch, each
        stopping after an EOS or `max_new_tokens` (one budget, or one per row). `step_logits`,
        when given, receives each row's (vocab,) logits per generated token; `fed` each row's
        logits right after its feed, what predicts its first new token.

        All rows advance in lockstep on one static cache, so no row ever holds a pad or a hole:
        the feeds' common length is one forward, then every step feeds each row one token, the
        next of its feed while it has one, else its own greedy choice. Rows whose feeds start
        with the same common tokens (an axis and its score read) share the rows of that forward.
        """
        n, lengths = len(feeds), [len(f) for f in feeds]
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n
        common = min(lengths)
        firsts: dict[bytes, int] = {}
        sources = [firsts.setdefault(np.asarray(f[:common], np.int64).tobytes(), r) for r, f in enumerate(feeds)]
        order = sorted(range(n), key=lambda r: (sources[r] != r, r))  # each common start's first row first
        if order != list(range(n)):
            inner_fed: list[torch.Tensor] | None = None if fed is None else []
            inner = self.decode(prefix, [feeds[r] for r in order], [budgets[r] for r in order],
                                None if step_logits is None else [step_logits[r] for r in order], inner_fed)
            back = sorted(range(n), key=order.__getitem__)  # each row's position in `order`
            if fed is not None:
                fed.extend(inner_fed[p] for p in back)
            return [inner[p] for p in back]
        heads = len(firsts) if common else n
        last = max(length + max(budget, 1) for length, budget in zip(lengths, budgets))  # tokens a row ever holds
        rows = self._step_rows(prefix, n, prefix.length + last - 1, common, heads)
        rows.sources.copy_(torch.tensor(sources if common else list(range(n))))
        deltas = prefix.rope_deltas[[0] * n]
        if common:
            ids, positions = rows.inputs["common"]
            ids.copy_(torch.from_numpy(np.stack([np.asarray(f[:common], np.int64) for f in feeds[:heads]])))
            positions.copy_(self._positions(torch.full((heads,), prefix.length, device=self.device), common,
                                            deltas[:heads]))
            logits = rows.run("common")
        else:
            logits = prefix.last_logits[[0] * n]
        ids, positions = rows.inputs["step"]
        positions.copy_(self._positions(torch.full((n,), prefix.length + common, device=self.device), 1, deltas))
        tokens: list[list[int]] = [[] for _ in range(n)]
        after_feed: list[torch.Tensor | None] = [None] * n
        done = [False] * n
        for step in range(common, last):
            chosen = logits.argmax(-1).tolist()  # one device sync per step
            for r, token in enumerate(chosen):
                if step == lengths[r]:
                    after_feed[r] = logits[r].clone()
                    done[r] = budgets[r] == 0
                if step >= lengths[r] and not done[r]:
                    tokens[r].append(token)
                    if step_logits is not None:
                        step_logits[r].append(logits[r].clone())
                    done[r] = token in self.eos_ids or len(tokens[r]) == budgets[r]
            if all(done):
                break
            feed = [int(feeds[r][step]) if step < lengths[r] else chosen[r] for r in range(n)]
            ids.copy_(torch.tensor(feed).view(n, 1))
            logits = rows.run("step")
        if fed is not None:
            fed.extend(after_feed)
        return tokens

    def _step_rows(self, prefix: Prefix, batch: int, length: int, common: int, heads: int) -> StepRows:
        """Rows for `decode` of at least `length` tokens, loaded with the prefix: the kept ones
        when they have the batch, common length and heads and room enough (their captured graphs
        are reused: a rubric over many videos captures again only for a longer video), else new
        ones (the old ones freed first) with room rounded up to `ROWS_ROOM` tokens."""
        kept = self.rows
        if kept is not None and ((kept.batch, kept.common, kept.heads) != (batch, common, heads) or kept.length < length):
            self.rows = kept = None  # no reference left: freed before the new ones are allocated
        length = self.rows.length if self.rows else -(-length // ROWS_ROOM) * ROWS_ROOM
        self.check_fits(1 if self.rows else 1 + batch, length)  # the prefix, and the rows unless kept
        if self.rows is None:
            self.rows = StepRows(self, prefix.cache, batch, length, common, heads)
        self.rows.load(prefix)
        return self.rows


class StepRows:
    """`batch` rows that continue one prefix over preallocated buffers: a static cache of `length`
    tokens (HF's StaticCache: key/value buffers for full-attention layers, conv and recurrent
    states for linear-attention ones) and the inputs of two forwards: "common", `common` tokens
    on each of the first `heads` rows, and "step", one token on every row.

    Rows whose feeds start with the same common tokens need that forward once: it runs on the
    first `heads` rows (views of the cache's first rows), and then every other row is copied
    from its source row (`sources`), cache and logits, as if it had run the forward itself.

    The addresses never change, so on CUDA each forward is captured as a CUDA graph once and
    replayed: a forward of a 9B model is hundreds of small kernels, and launching them from
    Python costs more than running them. The rows live as long as the engine keeps them, so a
    later request with as many rows, heads, the same common length and no more tokens replays
    the same graphs. A forward attends through an additive mask over the cache's slots (0 up to
    each token's own, the float minimum after): the keys HF's own causal mask would show it.
    """

    def __init__(self, engine: TorchEngine, like, batch: int, length: int, common: int, heads: int):
        from transformers import StaticCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        self.engine, self.batch, self.length, self.common, self.heads = engine, batch, length, common, heads
        device = engine.device
        self.cache = StaticCache(config=engine.net.config, max_cache_len=length)
        for src, dst in zip(like.layers, self.cache.layers):
            if isinstance(dst, LinearAttentionCacheLayerMixin):
                conv, recurrent = src.conv_states[0], src.recurrent_states[0]
                dst.lazy_initialization(conv.new_empty((batch, *conv.shape[1:])),
                                        recurrent.new_empty((batch, *recurrent.shape[1:])),
                                        conv_kernel_size=conv.shape[-1])
                dst.has_previous_state[0] = True
            else:
                dst.lazy_initialization(src.keys.new_empty((batch, *src.keys.shape[1:])),
                                        src.values.new_empty((batch, *src.values.shape[1:])))
        self.linear = LinearAttentionCacheLayerMixin
        self.head = self._first_rows(heads)
        self.sources = torch.zeros(batch, dtype=torch.long, device=device)  # each row's row in the common forward
        shapes = {"step": (batch, 1), **({"common": (heads, common)} if common else {})}
        self.inputs = {name: (torch.zeros(shape, dtype=torch.long, device=device),
                              torch.zeros((3, *shape), dtype=torch.long, device=device)) for name, shape in shapes.items()}
        self.seen = torch.zeros((), dtype=torch.long, device=device)  # tokens in the cache
        self.slots = torch.arange(length, device=device)
        self.graphs: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if device.type == "cuda" and engine.cuda_graphs:
            for name in shapes:
                self._capture(name)

    def _first_rows(self, rows: int):
        """The cache seen through its first `rows` rows: each layer a shallow copy whose buffers
        are views, so that a forward on it writes the big cache in place (the token counts are
        the same tensors)."""
        if rows == self.batch:
            return self.cache
        head = copy.copy(self.cache)
        head.layers = [_copy_layer(layer) for layer in self.cache.layers]
        for layer in head.layers:
            if isinstance(layer, self.linear):
                layer.conv_states[0] = layer.conv_states[0][:rows]
                layer.recurrent_states[0] = layer.recurrent_states[0][:rows]
            else:
                layer.keys, layer.values = layer.keys[:rows], layer.values[:rows]
        return head

    def _buffers(self, cache) -> list[torch.Tensor]:
        """Every per-row buffer of `cache`: keys and values, conv and recurrent states."""
        return [t for layer in cache.layers for t in ((layer.conv_states[0], layer.recurrent_states[0])
                                                       if isinstance(layer, self.linear) else (layer.keys, layer.values))]

    def masks(self, count: int) -> torch.Tensor:
        """The (1, 1, count, length) attention mask of `count` new tokens after the cached ones.
        HF passes a 4D mask to the attention layers as it is, and none to linear-attention ones."""
        dtype = self.engine.net.dtype
        query = self.seen + torch.arange(count, device=self.slots.device)
        mask = torch.zeros((1, 1, count, self.length), dtype=dtype, device=self.slots.device)
        return mask.masked_fill_(self.slots[None, :] > query[:, None], torch.finfo(dtype).min)

    def load(self, prefix: Prefix) -> None:
        """Every row of the next forward starts as prefix row 0: its keys, values and states
        copied in place (with a common forward, its rows only: it copies the rest)."""
        loaded = self.head if self.common else self.cache
        for src, dst in zip(prefix.cache.layers, loaded.layers):
            if isinstance(dst, self.linear):
                dst.conv_states[0].copy_(src.conv_states[0][:1])
                dst.recurrent_states[0].copy_(src.recurrent_states[0][:1])
            else:
                dst.keys[:, :, : prefix.length].copy_(src.keys[:1, :, : prefix.length])
                dst.values[:, :, : prefix.length].copy_(src.values[:1, :, : prefix.length])
                dst.cumulative_length.fill_(prefix.length)
        self.seen.fill_(prefix.length)

    def _forward(self, name: str) -> torch.Tensor:
        """Forward `name` ("common" or "step", its `inputs`) into the cache; the logits of every
        row's last token. Advances the positions and the count of tokens seen, so that a replay
        continues where the last one stopped."""
        ids, positions = self.inputs[name]
        count = ids.shape[1]
        cache = self.head if name == "common" else self.cache
        hidden = self.engine._hidden(cache, ids, positions, attention_mask=self.masks(count))
        self.seen.add_(count)
        positions.add_(count)
        logits = self.engine._logits(hidden[:, -1])
        if name == "common" and self.heads < self.batch:
            rest = self.sources[self.heads :]
            for buffer in self._buffers(self.cache):
                torch.index_select(buffer[: self.heads], 0, rest, out=buffer[self.heads :])
            logits = logits[self.sources]
        return logits

    def run(self, name: str) -> torch.Tensor:
        """`_forward(name)`: its graph replayed, or run eagerly (on a CPU, or with graphs off)."""
        if name not in self.graphs:
            return self._forward(name)
        graph, logits = self.graphs[name]
        graph.replay()
        return logits

    def _capture(self, name: str) -> None:
        """Capture `_forward(name)`. Its warm-up runs write garbage into the cache; `load`
        overwrites every slot a request reads."""
        self.graphs[name] = capture_graph(lambda: self._forward(name), self.engine.device,
                                          f"the {name} forward of {self.batch} rows")


class PromptRows:
    """One prompt's prefill: the language model over the prompt's embeddings (its videos'
    features in place) on a one-row static cache of exactly its length, from which decoding
    loads its rows.

    On CUDA the forward is captured as a CUDA graph once per prompt length and replayed for the
    next prompt of that length (a rubric over clips of one size and duration: every clip). Each
    run starts from an empty cache: the full-attention layers' token counts restart at 0 inside
    the forward, and the linear-attention layers take their no-previous-state path (chosen in
    Python, so when the graph is traced). The attention mask is causal over the cache's slots.
    """

    def __init__(self, engine: TorchEngine, length: int):
        from transformers import StaticCache

        self.engine, self.batch, self.length = engine, 1, length
        device, dtype = engine.device, engine.net.dtype
        self.cache = StaticCache(config=engine.net.config, max_cache_len=length)
        hidden = engine.net.get_input_embeddings().embedding_dim
        self.embeds = torch.zeros((1, length, hidden), dtype=dtype, device=device)
        self.positions = torch.zeros((3, 1, length), dtype=torch.long, device=device)
        later = torch.ones((length, length), dtype=torch.bool, device=device).triu(1)
        self.mask = torch.zeros((1, 1, length, length), dtype=dtype, device=device).masked_fill_(
            later, torch.finfo(dtype).min)
        self.graph = None
        if device.type == "cuda" and engine.cuda_graphs:
            self.graph, self.logits = capture_graph(self._forward, device, f"the prefill of {length} tokens")

    def _forward(self) -> torch.Tensor:
        """The prompt's forward into the emptied cache; the last token's logits."""
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        for layer in self.cache.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                layer.has_previous_state[0] = False
            else:
                layer.cumulative_length.zero_()
        hidden = self.engine._hidden(self.cache, None, self.positions, attention_mask=self.mask, embeds=self.embeds)
        return self.engine._logits(hidden[:, -1])

    def run(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The (1, vocab) logits after the prompt of these embeddings and (3, 1, length) positions,
        its cache in `cache`."""
        self.embeds.copy_(embeds)
        self.positions.copy_(positions)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


def capture_graph(forward, device: torch.device, what: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`forward` captured as a CUDA graph, with the tensor it returns (rewritten by each replay),
    after two eager runs on a side stream: Triton's autotuning and the libraries' workspaces must
    happen outside the capture."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = forward()
    except torch.OutOfMemoryError:
        raise InputError(f"out of GPU memory capturing {what}") from None
    return graph, out
