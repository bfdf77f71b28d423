"""Procedural robot-style clips whose label can only be read from the frames (numpy + OpenCV).

They train and test the shipped demo judge, so they must be generated on a robot-side install
(no torch) and be identical everywhere: every clip is a pure function of (task, seed, index).

Two tasks, side view, SIZE x SIZE pixels, FRAMES frames at FPS:

- "completion": a gripper carries one of two coloured objects (block or ball) towards one of
  two containers (box, bowl, bin) on a table, under an instruction such as "Place the red block
  in the bowl." Whether the instruction is complete shows only in the final frame, and only
  relative to the instruction's words: the right object in the right container is complete; the
  right object in the other container, the other object in the named container, the object left
  on the container's rim (a near miss), set down beside it, or never picked up, are not. In half
  of the clips a second arm sweeps in front of the containers while the object is put down.
- "plausibility": a ball falls and bounces on a floor; the score (1..5) says how physically
  plausible the motion is. See `PLAUSIBILITY_RUBRIC`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgejudge.errors import InputError

SIZE = 96  # a multiple of Qwen3-VL's 32-pixel merged patch: no resize, 3x3 tokens per frame pair
FRAMES = 16
FPS = 8.0
TASKS = ("completion", "plausibility")

PLAUSIBILITY_RUBRIC = """\
Score of a falling ball's motion, by the most severe thing it does (5 is physically plausible;
each lower score breaks a more basic expectation about solid objects under gravity):
  5  plausible: accelerates downwards, turns upwards only when it hits the floor, each bounce
     lower than the last, never enters the floor, moves continuously.
  4  hovering: stops in mid-air for several frames while falling, then falls on as before
     (gravity switched off for a moment).
  3  reversing mid-air: turns upwards in mid-air, well above the floor, with nothing to bounce
     off (a force from nowhere).
  2  passing through the floor: reaches the floor and keeps going down into it (solids
     interpenetrate).
  1  teleporting: vanishes and reappears far away from one frame to the next (no continuous path).
"""
PLAUSIBILITY_KINDS = {5: "plausible", 4: "hovering", 3: "reversing", 2: "through_floor", 1: "teleporting"}

# Colours are RGB. Object colours are the only words that tell the two objects apart.
OBJECT_COLORS = {"red": (215, 35, 35), "blue": (35, 70, 225), "green": (30, 170, 55), "yellow": (235, 205, 30)}
SHAPES = ("block", "ball")
CONTAINER_COLORS = {"box": (105, 55, 20), "bowl": (190, 90, 170), "bin": (20, 105, 110)}
GRIPPER = (95, 95, 105)
OCCLUDER = (120, 125, 135)

# Completion geometry: containers stand on the back of the table, objects start at the front.
TABLE_Y, BACK_Y, FRONT_Y = 66, 74, 91  # table top; bottom of back-row things; of front-row things
OBJ = 10  # object side / diameter
WALL = 3
CONTAINER_SIZE = {"box": (24, 16), "bowl": (26, 15), "bin": (20, 22)}  # width, height
CARRY_Y = 36  # bottom of a carried object on its way over the containers
# Outcomes, cycled by clip index so labels are exactly balanced: half complete.
COMPLETION_KINDS = ("complete", "rim", "complete", "beside", "complete", "wrong_container",
                    "complete", "wrong_object", "complete", "missed_grasp")

# Plausibility geometry.
FLOOR_Y = 80  # top of the floor band
BALL_RADIUS = 5


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([TASKS.index(task), seed, index])


def _background(rng: np.random.Generator, surface_y: int) -> np.ndarray:
    """A wall over a table or floor, with fixed per-clip noise so no two scenes look the same."""
    frame = np.empty((SIZE, SIZE, 3), np.float32)
    frame[:surface_y] = rng.uniform(175, 225) + rng.uniform(-12, 12, 3)
    frame[surface_y:] = np.array([rng.uniform(165, 200), rng.uniform(135, 165), rng.uniform(95, 125)])  # light wood
    frame += rng.normal(0, 3, (SIZE, SIZE, 1))
    return np.clip(frame, 0, 255).astype(np.uint8)


# --- completion --------------------------------------------------------------------------------


@dataclass
class _Object:
    color: str
    shape: str
    x: float  # centre
    bottom: float

    def draw(self, frame: np.ndarray) -> None:
        rgb, half = OBJECT_COLORS[self.color], OBJ // 2
        cx, cy = int(round(self.x)), int(round(self.bottom)) - half
        if self.shape == "block":
            cv2.rectangle(frame, (cx - half, cy - half), (cx + half - 1, cy + half - 1), rgb, -1)
        else:
            cv2.circle(frame, (cx, cy), half, rgb, -1, cv2.LINE_AA)


@dataclass
class _Container:
    kind: str
    x: int  # centre

    @property
    def width(self) -> int:
        return CONTAINER_SIZE[self.kind][0]

    @property
    def rim_y(self) -> int:
        return BACK_Y - CONTAINER_SIZE[self.kind][1]

    def draw(self, frame: np.ndarray) -> None:
        rgb, w, top = CONTAINER_COLORS[self.kind], self.width, self.rim_y
        x0, x1 = self.x - w // 2, self.x + w // 2
        if self.kind == "bowl":
            cv2.ellipse(frame, (self.x, top), (w // 2, BACK_Y - top), 0, 0, 180, rgb, WALL, cv2.LINE_AA)
            cv2.line(frame, (x0 - 1, top), (x0 + 2, top), rgb, 2)
            cv2.line(frame, (x1 - 2, top), (x1 + 1, top), rgb, 2)
        else:  # box and bin: an open-topped U
            cv2.rectangle(frame, (x0, top), (x0 + WALL - 1, BACK_Y - 1), rgb, -1)
            cv2.rectangle(frame, (x1 - WALL + 1, top), (x1, BACK_Y - 1), rgb, -1)
            cv2.rectangle(frame, (x0, BACK_Y - WALL), (x1, BACK_Y - 1), rgb, -1)


def _draw_gripper(frame: np.ndarray, x: float, bottom: float, closed: bool) -> None:
    """An arm from the top edge ending in two fingers whose tips are at `bottom`."""
    x, bottom = int(round(x)), int(round(bottom))
    spread = OBJ // 2 + 1 if closed else OBJ // 2 + 4
    palm = bottom - OBJ - 3
    cv2.rectangle(frame, (x - 2, 0), (x + 2, palm), GRIPPER, -1)
    cv2.rectangle(frame, (x - spread - 2, palm - 2), (x + spread + 2, palm), GRIPPER, -1)
    for side in (-1, 1):
        fx = x + side * (spread + 1)
        cv2.rectangle(frame, (fx - 1, palm), (fx + 1, bottom), GRIPPER, -1)


def _path(keys: list[tuple[int, float, float]], t: int) -> tuple[float, float]:
    """Piecewise-linear (x, bottom) at frame t through keyframes (frame, x, bottom)."""
    frames = [k[0] for k in keys]
    return float(np.interp(t, frames, [k[1] for k in keys])), float(np.interp(t, frames, [k[2] for k in keys]))


def _completion(rng: np.random.Generator, index: int) -> tuple[np.ndarray, dict]:
    kind = COMPLETION_KINDS[index % len(COMPLETION_KINDS)]
    colors = rng.choice(list(OBJECT_COLORS), 2, replace=False)
    kinds = rng.choice(list(CONTAINER_COLORS), 2, replace=False)
    # Containers left and right of centre, leaving room beside each on the inner side.
    xs = [int(rng.integers(16, 27)), int(rng.integers(70, 81))]
    if rng.random() < 0.5:
        kinds = kinds[::-1]
    containers = [_Container(str(k), x) for k, x in zip(kinds, xs)]
    ox = rng.uniform(10, 40)
    obj_xs = [ox, ox + rng.uniform(OBJ + 8, 45)]
    if rng.random() < 0.5:
        obj_xs = [SIZE - x for x in obj_xs]
    objects = [_Object(str(c), str(rng.choice(SHAPES)), x, FRONT_Y) for c, x in zip(colors, obj_xs)]
    named_obj, named_box = int(rng.integers(2)), int(rng.integers(2))
    target = objects[named_obj]
    instruction = (f"{rng.choice(['Place', 'Put'])} the {target.color} {target.shape} "
                   f"{rng.choice(['in', 'into'])} the {containers[named_box].kind}.")

    moved = objects[1 - named_obj] if kind == "wrong_object" else target
    dest = containers[1 - named_box] if kind == "wrong_container" else containers[named_box]
    dest_x, dest_bottom = dest.x + rng.uniform(-2, 2), BACK_Y - WALL
    if kind == "rim":  # resting on the wall nearer the centre of the table: above, not inside
        side = 1 if dest.x < SIZE / 2 else -1
        dest_x, dest_bottom = dest.x + side * (dest.width // 2 - 1) + rng.uniform(-1, 1), dest.rim_y
    elif kind == "beside":
        side = 1 if dest.x < SIZE / 2 else -1
        dest_x, dest_bottom = dest.x + side * (dest.width // 2 + OBJ // 2 + rng.uniform(3, 8)), BACK_Y

    start_x = rng.uniform(20, 76)
    grasp, lift, over, down = 4, 6, 9, 11
    keys = [(0, start_x, 14), (grasp - 1, moved.x, moved.bottom), (grasp, moved.x, moved.bottom),
            (lift, moved.x, CARRY_Y), (over, dest_x, CARRY_Y), (down, dest_x, dest_bottom),
            (down + 1, dest_x, dest_bottom), (FRAMES - 1, dest_x + rng.uniform(-10, 10), 22 - rng.uniform(0, 8))]
    occluder = rng.random() < 0.5
    occluder_from = (-12, SIZE + 12) if rng.random() < 0.5 else (SIZE + 12, -12)
    background = _background(rng, TABLE_Y)

    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
    for t in range(FRAMES):
        frame = background.copy()
        gx, gy = _path(keys, t)
        carrying = grasp <= t <= down and kind != "missed_grasp"
        if carrying:
            moved.x, moved.bottom = gx, gy
        elif t > down and kind != "missed_grasp":
            moved.x, moved.bottom = dest_x, dest_bottom
        for c in containers:
            c.draw(frame)
        for o in objects:
            o.draw(frame)
        _draw_gripper(frame, gx, gy, closed=grasp <= t <= down)
        if occluder and over <= t <= down + 2:  # a second arm sweeping in front of the containers
            frac = (t - over) / (down + 2 - over)
            x = int(occluder_from[0] + frac * (occluder_from[1] - occluder_from[0]))
            cv2.rectangle(frame, (x - 9, 30), (x + 9, SIZE - 1), OCCLUDER, -1)
            cv2.rectangle(frame, (x - 3, 0), (x + 3, 30), OCCLUDER, -1)
        frames[t] = frame
    record = {"instruction": instruction, "label": "complete" if kind == "complete" else "not complete",
              "kind": kind, "occluded": bool(occluder)}
    return frames, record


# --- plausibility ------------------------------------------------------------------------------


def _ball_track(rng: np.random.Generator, score: int) -> list[tuple[float, float]] | None:
    """Ball centres per frame for one draw of the physics, with the violation that `score` names;
    None when this draw would not show it clearly (the caller draws again).

    Integrated per frame; a ball that would pass the floor within a frame is shown touching it,
    so every bounce is visible at the frame it happens.
    """
    floor = FLOOR_Y - BALL_RADIUS  # centre height of a ball resting on the floor
    x, y = rng.uniform(18, 78), rng.uniform(12, 40)
    vx, vy = rng.uniform(-1.5, 1.5), rng.uniform(-4, 1.5)
    g, bounce = rng.uniform(1.5, 2.5), rng.uniform(0.45, 0.75)
    onset = int(rng.integers(2, 9))  # earliest frame the violation may start
    event_at = contact_at = None
    hover_left, sinking = 0, False
    track = []
    for t in range(FRAMES):
        track.append((x, y))
        if hover_left:
            hover_left -= 1
            continue
        ready = event_at is None and t >= onset
        if ready and score == 4 and vy > 3 and floor - y > 20:
            hover_left, event_at = int(rng.integers(3, 6)), t
            continue
        if ready and score == 3 and vy > 3 and floor - y > 25:
            vy, event_at = -rng.uniform(6, 10), t
        if ready and score == 1:
            dx = rng.choice([-1, 1]) * rng.uniform(25, 40)
            if not 10 < x + dx < SIZE - 10:
                dx = -dx
            x, y, event_at = x + dx, float(np.clip(y + rng.uniform(-25, 15), 10, floor - 8)), t
            track[-1] = (x, y)  # the jump shows at this very frame
        x += vx
        if not 8 < x < SIZE - 8:
            vx, x = -vx, float(np.clip(x, 8, SIZE - 8))
        if sinking:  # through the floor at a steady pace, so it shows for a few frames
            y += vy
            continue
        vy += g
        y += vy
        if y >= floor:
            y, contact_at = floor, t + 1 if contact_at is None else contact_at
            if score == 2:
                sinking, event_at, vy = True, t + 1, rng.uniform(3, 4.5)
            else:
                vy = -vy * bounce if vy * bounce > 2 * g else 0.0  # too slow to bounce visibly: rest
    last = FRAMES - 1
    if score == 5 and (contact_at is None or contact_at > last - 3):
        return None
    if score == 2 and (event_at is None or event_at > last - 4):
        return None
    if score in (3, 4) and (event_at is None or event_at > last - 5):
        return None
    return track


def _plausibility(rng: np.random.Generator, index: int) -> tuple[np.ndarray, dict]:
    score = 5 - index % 5
    while (track := _ball_track(rng, score)) is None:
        pass
    color = str(rng.choice(list(OBJECT_COLORS)))
    background = _background(rng, FLOOR_Y)
    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
    for t, (x, y) in enumerate(track):
        frame = background.copy()
        cv2.circle(frame, (int(round(x)), int(round(y))), BALL_RADIUS, OBJECT_COLORS[color], -1, cv2.LINE_AA)
        frames[t] = frame
    verb = "is tossed up and falls" if track[1][1] < track[0][1] else str(rng.choice(["falls", "drops"]))
    record = {"caption": f"A {color} ball {verb} onto the floor.", "score": score, "kind": PLAUSIBILITY_KINDS[score]}
    return frames, record


# --- API ---------------------------------------------------------------------------------------


def make_clip(task: str, seed: int, index: int) -> tuple[np.ndarray, dict]:
    """Frames (FRAMES, SIZE, SIZE, 3) uint8 RGB and the record of clip `index` of split `seed`.

    The record holds the text the judge is given ("instruction" or "caption"), the answer
    ("label" or "score") and the scenario ("kind").
    """
    if task not in TASKS:
        raise InputError(f"unknown clip task {task!r}; choose one of {', '.join(TASKS)}")
    make = _completion if task == "completion" else _plausibility
    frames, record = make(_rng(task, seed, index), index)
    return frames, {"id": f"{task}-{seed}-{index:05d}", "task": task, **record}


def write_mp4(path: Path, frames: np.ndarray, fps: float = FPS) -> None:
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise InputError(f"{path}: OpenCV cannot write mp4v video here")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def generate(out_dir: str | Path, task: str, n: int, seed: int) -> list[dict]:
    """Write clips 0..n-1 of split `seed` as mp4 files into `out_dir`, and their records as JSON
    lines to `out_dir`/<task>.jsonl (each with "video", relative to `out_dir`). Returns the records.

    Use different seeds for training and held-out splits: clips of one seed never repeat another's.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(n):
        frames, record = make_clip(task, seed, index)
        record["video"] = f"{record['id']}.mp4"
        write_mp4(out / record["video"], frames)
        records.append(record)
    (out / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def read_labels(path: str | Path) -> list[dict]:
    """The records of a labels file written by `generate`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such labels file")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
