"""edgejudge: a lightweight, quantized edge runtime for video-language judge models.

    import edgejudge
    model = edgejudge.load("path/to/model")            # config, tokenizer, template, processor constants
    clip = edgejudge.read_video("clip.mp4")             # or a (T, H, W, 3) uint8 array, fps=...
    clip = edgejudge.sample_clip(model, clip, "uniform:64")
    arrays = edgejudge.build_inputs(model, [clip], "Instruction: ...")   # what HF would feed the model
"""

from edgejudge.errors import InputError
from edgejudge.runtime.model import build_inputs, load, render_prompt, sample_clip
from edgejudge.runtime.video import read_video

__version__ = "0.1.0"
__all__ = ["InputError", "build_inputs", "load", "read_video", "render_prompt", "sample_clip"]
