"""Qwen3.5 (hybrid Gated DeltaNet + full attention): its inputs are built exactly like Qwen3-VL's.

HF gives Qwen3.5 the Qwen3-VL processor and the same get_rope_index; the partial rotary factor
only changes how many head dimensions the positions rotate, inside the model. What differs here
is the release line its judges were trained with (the first 5.x releases that know Qwen3.5).
"""

from edgejudge.runtime.qwen3_vl import (
    MROPE_INTERLEAVED,
    fps_indices,
    position_ids,
    target_size,
    video_extras,
    video_placeholder,
    video_text,
)

HF_DEFAULT = "5.2"

__all__ = [
    "HF_DEFAULT", "MROPE_INTERLEAVED", "fps_indices", "position_ids", "target_size", "video_extras", "video_placeholder", "video_text",
]
