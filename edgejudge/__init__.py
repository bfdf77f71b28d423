"""edgejudge: a lightweight, quantized edge runtime for video-language judge models.

    import edgejudge
    model = edgejudge.load("path/to/model")            # config, tokenizer, template, processor constants
    clip = edgejudge.read_video("clip.mp4")             # or a (T, H, W, 3) uint8 array, fps=...
    clip = edgejudge.sample_clip(model, clip, "uniform:64")
    arrays = edgejudge.build_inputs(model, [clip], "Instruction: ...")   # what HF would feed the model

    judge = edgejudge.Judge.load("path/to/onnx-artifact")                # then, in the control loop:
    decision = judge.check("Place the red block in the box.", views={"right": frames, "left": frames})
"""

from edgejudge.errors import InputError
from edgejudge.judge import Judge
from edgejudge.runtime.model import build_inputs, load, render_prompt, sample_clip
from edgejudge.runtime.video import read_video

__version__ = "0.1.0"
__all__ = ["InputError", "Judge", "build_inputs", "load", "read_video", "render_prompt", "sample_clip"]
