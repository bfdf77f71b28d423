"""`edgejudge verify`: an artifact against its reference on the user's own videos.

The accuracy gate before deploying a quantized judge. The same inputs (built once, by the
artifact's own files) go through the artifact and through the HF reference (the base model in
fp32 with the adapter unmerged, exactly as it was trained), and each candidate label is scored by
its own forward over prompt + label: mean NLL per label token, lowest wins. Reported per video:
both NLLs, their difference, and whether the decisions agree.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgejudge.errors import InputError
from edgejudge.manifest import verify_artifact
from edgejudge.runtime import model as runtime_model
from edgejudge.runtime.decoder import VisualRows
from edgejudge.runtime.engine import label_positions, mean_nll
from edgejudge.runtime.video import Clip
from edgejudge.specs import JudgeSpec


class OnnxScorer:
    """Label NLLs from an ONNX artifact, torch-free: vision encoder, decoder, LM head."""

    def __init__(self, artifact: Path, family: str):
        from edgejudge.runtime.decoder import TextDecoder
        from edgejudge.runtime.vision import load_vision_encoder

        self.vision = load_vision_encoder(Path(artifact) / "vision.onnx", family)
        self.decoder = TextDecoder(artifact)

    def __call__(self, model: runtime_model.Model, arrays: dict, labels: tuple[str, ...]) -> dict[str, float]:
        visual = VisualRows.of(*self.vision.encode(arrays["pixel_values_videos"], arrays["video_grid_thw"]))
        prompt_len = arrays["input_ids"].shape[1]
        scores = {}
        for label in labels:
            label_ids = model.prompter.encode(label)
            ids, positions = label_positions(arrays, label_ids)
            embeds, deepstack = self.decoder.multimodal_embeds(ids, model.video_token_id, visual)
            hidden = self.decoder.prefill(embeds, *self.decoder.cos_sin(positions), deepstack)
            scores[label] = mean_nll(self.decoder.logits(hidden[:, prompt_len - 1 : -1])[0], label_ids)
        return scores


class TorchScorer:
    """Label NLLs from a transformers model: the HF reference, or a bnb artifact."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, model: runtime_model.Model, arrays: dict, labels: tuple[str, ...]) -> dict[str, float]:
        device = next(self.model.parameters()).device
        prompt_len = arrays["input_ids"].shape[1]
        scores = {}
        for label in labels:
            label_ids = model.prompter.encode(label)
            ids, positions = (torch.from_numpy(a).to(device) for a in label_positions(arrays, label_ids))
            # our positions, not the ones this transformers release would compute: they are the
            # training release's (docs/hf-divergences.md), and `arrays` were built for it
            logits = self.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                pixel_values_videos=torch.from_numpy(arrays["pixel_values_videos"]).to(device),
                video_grid_thw=torch.from_numpy(arrays["video_grid_thw"]).to(device),
                mm_token_type_ids=(ids == model.video_token_id).long() * 2,
            ).logits[0, prompt_len - 1 : -1]
            scores[label] = mean_nll(logits.float().cpu().numpy(), label_ids)
        return scores


    @torch.no_grad()
    def greedy(self, model: runtime_model.Model, arrays: dict, max_new_tokens: int) -> list[int]:
        """HF `generate`'s greedy tokens after the prompt (the model's generation config, as the
        runtime's greedy decoding reads it), stopping at EOS."""
        device = next(self.model.parameters()).device
        ids = torch.from_numpy(arrays["input_ids"]).to(device)
        # generate computes the M-RoPE positions itself: Qwen2.5-VL's need the clip's seconds per
        # temporal patch (HF's default, 1.0, is right only at 2 fps)
        timing = {"second_per_grid_ts": torch.from_numpy(arrays["second_per_grid_ts"]).to(device)
                  } if "second_per_grid_ts" in arrays else {}
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            pixel_values_videos=torch.from_numpy(arrays["pixel_values_videos"]).to(device),
            video_grid_thw=torch.from_numpy(arrays["video_grid_thw"]).to(device),
            mm_token_type_ids=(ids == model.video_token_id).long() * 2,
            do_sample=False, max_new_tokens=max_new_tokens, **timing,
        )
        return out[0, ids.shape[1]:].tolist()


def reference_scorer(reference: Path, adapter: Path | None, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> TorchScorer:
    """The base with the adapter unmerged: the judge exactly as trained (fp32), or HF's own run of
    it in a lower precision (what an fp16 artifact's error is measured against as a floor)."""
    from edgejudge.export.merge import check_adapter, load_base

    model = load_base(reference, dtype=dtype, device=device)
    if adapter is not None:
        from peft import PeftModel

        check_adapter(reference, adapter)
        model = PeftModel.from_pretrained(model, adapter)
    return TorchScorer(model)


def artifact_scorer(artifact: Path, device: str = "cpu"):
    manifest = verify_artifact(artifact)
    if manifest.format == "onnx":
        return OnnxScorer(artifact, manifest.family)
    from transformers import AutoModelForImageTextToText

    return TorchScorer(AutoModelForImageTextToText.from_pretrained(artifact, device_map=device))


def verify(model: runtime_model.Model, reference: Path, adapter: Path | None, spec: JudgeSpec, clips: list[Clip],
           text: str, device: str = "cpu") -> list[dict]:
    """One report per clip for the artifact `model` (from runtime_model.load): both label NLLs,
    their largest difference, and decision agreement."""
    if spec.answer != "labels":
        raise InputError(f"verify scores candidate labels; spec {spec.name} answers {spec.answer} (not supported yet)")
    if model.family_name not in spec.families:
        raise InputError(f"{model.path} is a {model.family_name} artifact; spec {spec.name} needs {', '.join(spec.families)}")
    ours, ref = artifact_scorer(model.path, device), reference_scorer(reference, adapter, device)
    reports = []
    for clip in clips:
        arrays = runtime_model.build_inputs(model, [clip], text)
        a, r = ours(model, arrays, spec.labels), ref(model, arrays, spec.labels)
        reports.append({
            "artifact": a, "reference": r,
            "max_abs_nll_diff": max(abs(a[label] - r[label]) for label in spec.labels),
            "artifact_decision": min(a, key=a.get), "reference_decision": min(r, key=r.get),
            "agree": min(a, key=a.get) == min(r, key=r.get),
        })
    return reports
