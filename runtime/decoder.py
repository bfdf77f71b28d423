"""Qwen3-VL's text decoder on ONNX Runtime with a KV cache (numpy + onnxruntime only).

The graphs come from `edgejudge.export.onnx_decoder`: `decoder.onnx` (layers + final norm, fused
ORT ops, KV cache in/out), `lm_head.onnx` (logits only at the positions asked for), `embed.npy`
(the token-embedding table, memory-mapped) and `decoder.npz` (rotary inverse frequencies, the
mrope section, sizes).

Positions: the prompt's (3, B, S) M-RoPE position ids come from `edgejudge.runtime.model.build_inputs`;
a token decoded at sequence index i sits at i + rope_delta on all three axes
(`decode_position_ids`). `mrope_cos_sin` turns either into the (B, S, head_dim) cos/sin tables
the graph takes, with HF 5.17's interleaved layout (`Qwen3VLTextRotaryEmbedding`): frequency j
uses the height axis when j % 3 == 1 and j < 3 * section[1], the width axis when j % 3 == 2 and
j < 3 * section[2], the time axis otherwise; the half table is repeated twice (rotate-half).

The KV cache is a list of numpy arrays (B, kv_heads, length, head_dim) per layer, on the CPU;
IO binding / device-resident caches come later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from edgejudge.errors import InputError

DECODER_NAME, LM_HEAD_NAME, EMBED_NAME, SIDECAR_NAME = "decoder.onnx", "lm_head.onnx", "embed.npy", "decoder.npz"


def _rope_params(config: Mapping) -> tuple[np.ndarray, list[int], float]:
    """(inv_freq float32, mrope_section, attention_scaling) from the exported sidecar (preferred:
    HF's own inv_freq buffer) or from an HF config dict (config.json, or its text_config)."""
    if "inv_freq" in config:
        return (np.asarray(config["inv_freq"], np.float32), [int(s) for s in np.asarray(config["mrope_section"])],
                float(config.get("attention_scaling", 1.0)))
    tc = config.get("text_config", config)
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"rope_type {rope.get('rope_type')!r} is not supported")
    theta = float(rope.get("rope_theta", tc.get("rope_theta", 10000.0)))
    dim = int(tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"])
    inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    return inv_freq, [int(s) for s in rope.get("mrope_section", [24, 20, 20])], 1.0


def mrope_cos_sin(position_ids: np.ndarray, config: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(3, B, S) integer positions -> cos, sin, each (B, S, head_dim) float32 (Qwen3-VL interleaved M-RoPE)."""
    inv_freq, section, scaling = _rope_params(config)
    pos = np.asarray(position_ids)
    if pos.ndim != 3 or pos.shape[0] != 3:
        raise InputError(f"position_ids of shape {pos.shape}: expected (3, batch, seq)")
    half = len(inv_freq)
    j = np.arange(half)
    axis = np.zeros(half, np.int64)
    axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    # freqs[b, s, j] = pos[axis[j], b, s] * inv_freq[j], a float32 product as in HF's matmul over a 1-wide dim
    chosen = np.moveaxis(pos[axis], 0, -1).astype(np.float32)  # (B, S, half)
    freqs = chosen * inv_freq
    # cos/sin in float64, rounded: within an ulp of torch's float32 kernels.
    cos = np.cos(freqs.astype(np.float64))
    sin = np.sin(freqs.astype(np.float64))
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    cos = np.concatenate([cos, cos], axis=-1).astype(np.float32)
    sin = np.concatenate([sin, sin], axis=-1).astype(np.float32)
    return cos, sin


def decode_position_ids(start: int, count: int, rope_deltas: np.ndarray, batch: int = 1) -> np.ndarray:
    """(3, B, count) positions of tokens at sequence indices start..start+count-1 after a prompt:
    index + rope_delta on all three axes."""
    delta = np.asarray(rope_deltas, np.int64).reshape(-1, 1)
    if delta.shape[0] not in (1, batch):
        raise InputError(f"rope_deltas of shape {np.shape(rope_deltas)} for a batch of {batch}")
    pos = np.arange(start, start + count, dtype=np.int64)[None, :] + delta  # (B or 1, count)
    return np.broadcast_to(pos, (batch, count))[None].repeat(3, axis=0)


class TextDecoder:
    """ONNX Runtime sessions on the exported decoder and LM head, plus a numpy KV cache."""

    def __init__(self, folder: str | Path, providers=("CPUExecutionProvider",), session_options=None):
        import onnxruntime as ort

        self.folder = Path(folder)
        missing = [n for n in (DECODER_NAME, LM_HEAD_NAME, EMBED_NAME, SIDECAR_NAME) if not (self.folder / n).is_file()]
        if missing:
            raise InputError(f"{self.folder}: no exported decoder (missing {', '.join(missing)})")
        with np.load(self.folder / SIDECAR_NAME) as data:
            self.rope = {k: data[k] for k in ("inv_freq", "mrope_section", "attention_scaling")}
            self.hidden_size = int(data["hidden_size"])
            self.head_dim = int(data["head_dim"])
            self.num_layers = int(data["num_layers"])
            self.num_kv_heads = int(data["num_kv_heads"])
            self.num_deepstack = int(data["num_deepstack"])
            self.vocab_size = int(data["vocab_size"])
        self.embed_table = np.load(self.folder / EMBED_NAME, mmap_mode="r")
        providers = list(providers)
        self.session = ort.InferenceSession(str(self.folder / DECODER_NAME), sess_options=session_options,
                                            providers=providers)
        self.head = ort.InferenceSession(str(self.folder / LM_HEAD_NAME), sess_options=session_options,
                                         providers=providers)
        self.past: list[tuple[np.ndarray, np.ndarray]] = []
        self.past_length = 0
        self.batch = 0

    # -- inputs ---------------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """(B, S) token ids -> (B, S, hidden) float32."""
        ids = np.asarray(input_ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(f"token ids outside the vocabulary of {self.vocab_size}")
        return np.asarray(self.embed_table[ids], np.float32)

    def cos_sin(self, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mrope_cos_sin(position_ids, self.rope)

    def multimodal_embeds(self, input_ids: np.ndarray, video_token_id: int, features: np.ndarray,
                          deepstack: list[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token embeddings with the visual features written at the video-token positions (HF's
        masked_scatter, row-major over the batch) and the (n_taps, B, S, hidden) DeepStack input
        (the taps at the same positions, zeros elsewhere)."""
        ids = np.asarray(input_ids, np.int64)
        embeds = self.embed(ids)
        mask = ids == video_token_id
        if int(mask.sum()) != len(features):
            raise InputError(f"{int(mask.sum())} video tokens but {len(features)} visual features")
        embeds[mask] = features
        taps = np.zeros((self.num_deepstack, *ids.shape, self.hidden_size), np.float32)
        if len(deepstack) != self.num_deepstack:
            raise InputError(f"{len(deepstack)} DeepStack taps, the decoder takes {self.num_deepstack}")
        for i, tap in enumerate(deepstack):
            taps[i][mask] = tap
        return embeds, taps

    # -- running --------------------------------------------------------------------------------
    def reset(self, batch: int = 1) -> None:
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), np.float32)
        self.past = [(empty, empty) for _ in range(self.num_layers)]
        self.past_length = 0
        self.batch = batch

    def _run(self, inputs_embeds, cos, sin, deepstack) -> np.ndarray:
        embeds = np.ascontiguousarray(inputs_embeds, np.float32)
        b, s, hidden = embeds.shape
        if hidden != self.hidden_size:
            raise InputError(f"inputs_embeds of hidden size {hidden}, the decoder takes {self.hidden_size}")
        if b != self.batch:
            raise InputError(f"a batch of {b} for a cache of batch {self.batch}: call reset(batch) / prefill first")
        for name, table in (("cos", cos), ("sin", sin)):
            if np.shape(table) != (b, s, self.head_dim):
                raise InputError(f"{name} of shape {np.shape(table)}, expected {(b, s, self.head_dim)}")
        if deepstack is None:
            deepstack = np.zeros((self.num_deepstack, b, s, hidden), np.float32)
        elif np.shape(deepstack) != (self.num_deepstack, b, s, hidden):
            raise InputError(f"deepstack of shape {np.shape(deepstack)}, expected {(self.num_deepstack, b, s, hidden)}")
        total = self.past_length + s
        feed = {
            "inputs_embeds": embeds,
            "cos": np.ascontiguousarray(cos, np.float32),
            "sin": np.ascontiguousarray(sin, np.float32),
            "deepstack": np.ascontiguousarray(deepstack, np.float32),
            "seqlens_k": np.full((b,), total - 1, np.int32),  # no padding: every row is `total` long
            "total_sequence_length": np.asarray(total, np.int32),
        }
        for i, (key, value) in enumerate(self.past):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = key, value
        outputs = self.session.run(None, feed)
        hidden_out = outputs[0]
        self.past = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.num_layers)]
        self.past_length = total
        return hidden_out

    def prefill(self, inputs_embeds: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                deepstack: np.ndarray | None = None) -> np.ndarray:
        """Run the prompt from an empty cache: (B, S, hidden) final-norm hidden states."""
        self.reset(int(np.shape(inputs_embeds)[0]))
        return self._run(inputs_embeds, cos, sin, deepstack)

    def step(self, inputs_embeds: np.ndarray, cos: np.ndarray, sin: np.ndarray,
             deepstack: np.ndarray | None = None) -> np.ndarray:
        """Extend the cached sequence by S >= 1 tokens (no DeepStack unless given): (B, S, hidden)."""
        if not self.past:
            raise InputError("step() before prefill()")
        return self._run(inputs_embeds, cos, sin, deepstack)

    def logits(self, hidden_at_positions: np.ndarray) -> np.ndarray:
        """(B, K, hidden) hidden states -> (B, K, vocab) float32 logits."""
        hidden = np.ascontiguousarray(hidden_at_positions, np.float32)
        if hidden.ndim == 2:
            hidden = hidden[:, None]
        return self.head.run(None, {"hidden": hidden})[0]

    def greedy(self, first_logits: np.ndarray, start: int, rope_deltas: np.ndarray, max_new_tokens: int,
               eos_token_ids=(), return_logits: bool = False):
        """Greedy decoding of one sequence after prefill: `first_logits` (vocab,) at the prompt's
        last position, `start` the prompt length. Stops after an EOS token (included).
        Returns the tokens, and with `return_logits` also each step's (vocab,) logits."""
        eos = {int(t) for t in np.atleast_1d(eos_token_ids)} if eos_token_ids is not None else set()
        steps = [np.asarray(first_logits, np.float32)]
        tokens = [int(np.argmax(steps[0]))]
        for index in range(start, start + max_new_tokens - 1):
            if tokens[-1] in eos:
                break
            cos, sin = self.cos_sin(decode_position_ids(index, 1, rope_deltas))
            hidden = self.step(self.embed(np.array([[tokens[-1]]])), cos, sin)
            steps.append(self.logits(hidden[:, -1:])[0, -1])
            tokens.append(int(np.argmax(steps[-1])))
        return (tokens, steps) if return_logits else tokens
