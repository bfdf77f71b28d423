"""Procedural robot-style clips whose label can only be read from the frames (numpy + OpenCV).

They train and test the shipped demo judge, so they must be generated on a robot-side install
(no torch) and be identical everywhere: every clip is a pure function of (task, seed, index).

Two tasks, side view, SIZE x SIZE pixels, FRAMES frames at FPS:

- "completion": a gripper carries the named one of two coloured objects (block or ball)
  towards a container (box, bowl or bin) on a table, under an instruction such as "Place the red
  block in the bowl." Whether the instruction is complete shows only in the final frame: the
  object inside the container is complete; left on the rim (a near miss), set down beside the
  container, still held above it, or never picked up, it is not. In half of the clips a second
  arm sweeps in front of the container while the object is put down.
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
  5  plausible: dropped, accelerates downwards, turns upwards only when it hits the floor, each
     bounce lower than the last, never enters the floor, moves continuously.
  4  hovering: stops in mid-air for about a second while falling, then falls on as before
     (gravity switched off for a moment).
  3  reversing mid-air: turns upwards well above the floor and rises for most of a second with
     nothing to bounce off (a force from nowhere), then falls again.
  2  passing through the floor: reaches the floor and sinks into it until it is gone (solids
     interpenetrate).
  1  teleporting: vanishes for a moment and reappears far away (no continuous path at all).
"""
PLAUSIBILITY_KINDS = {5: "plausible", 4: "hovering", 3: "reversing", 2: "through_floor", 1: "teleporting"}

# Colours are RGB. Object colours are the words that tell the two objects apart.
OBJECT_COLORS = {"red": (215, 35, 35), "blue": (35, 70, 225), "green": (30, 170, 55), "yellow": (235, 205, 30)}
SHAPES = ("block", "ball")
CONTAINER_COLORS = {"box": (105, 55, 20), "bowl": (190, 90, 170), "bin": (20, 105, 110)}
GRIPPER = (95, 95, 105)
OCCLUDER = (120, 125, 135)

# Completion geometry: the container stands at the back of the table, objects start at the front.
# Objects are large for the frame (14 of 96 pixels): a tiny judge trained from scratch needs
# them to fill a good part of a 32-pixel vision token.
TABLE_Y, BACK_Y, FRONT_Y = 66, 74, 92  # table top; bottom of back-row things; of front-row things
OBJ = 14  # object side / diameter
WALL = 3
INTERIOR_SHADE = 0.45  # a container's inside, as a share of its wall colour
CONTAINER_SIZE = {"box": (32, 20), "bowl": (34, 18), "bin": (28, 26)}  # width, height
CARRY_Y = 36  # bottom of a carried object on its way over the container
# Outcomes, cycled by clip index so labels are exactly balanced: half complete.
COMPLETION_KINDS = ("complete", "rim", "complete", "beside", "complete", "held", "complete", "missed_grasp")

# Plausibility geometry.
FLOOR_Y = 78  # top of the floor band, drawn in front of the ball
BALL_RADIUS = 7


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
        """Walls around a dark interior: an object inside is seen against the interior, one on
        the rim or beside against the wall or table behind it."""
        rgb, w, top = CONTAINER_COLORS[self.kind], self.width, self.rim_y
        x0, x1 = self.x - w // 2, self.x + w // 2
        interior = tuple(int(c * INTERIOR_SHADE) for c in rgb)
        if self.kind == "bowl":
            cv2.ellipse(frame, (self.x, top), (w // 2, BACK_Y - top), 0, 0, 180, interior, -1, cv2.LINE_AA)
            cv2.ellipse(frame, (self.x, top), (w // 2, BACK_Y - top), 0, 0, 180, rgb, WALL, cv2.LINE_AA)
            cv2.line(frame, (x0 - 1, top), (x0 + 2, top), rgb, 2)
            cv2.line(frame, (x1 - 2, top), (x1 + 1, top), rgb, 2)
        else:  # box and bin: an open-topped U
            cv2.rectangle(frame, (x0, top), (x1, BACK_Y - 1), interior, -1)
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
    container = _Container(str(rng.choice(list(CONTAINER_COLORS))), int(rng.integers(36, 61)))
    colors = rng.choice(list(OBJECT_COLORS), 2, replace=False)
    first = rng.uniform(10, 60)
    obj_xs = [first, first + rng.uniform(OBJ + 4, 86 - first)]
    if rng.random() < 0.5:
        obj_xs = obj_xs[::-1]
    objects = [_Object(str(c), str(rng.choice(SHAPES)), x, FRONT_Y) for c, x in zip(colors, obj_xs)]
    target = objects[int(rng.integers(2))]
    instruction = (f"{rng.choice(['Place', 'Put'])} the {target.color} {target.shape} "
                   f"{rng.choice(['in', 'into'])} the {container.kind}.")

    dest_x, dest_bottom = container.x + rng.uniform(-2, 2), BACK_Y - WALL
    side = 1 if container.x < SIZE / 2 else -1  # towards the roomier side of the table
    if kind == "rim":  # resting on a wall: above the opening, not inside
        dest_x, dest_bottom = container.x + side * (container.width // 2 - 1) + rng.uniform(-1, 1), container.rim_y
    elif kind == "beside":
        dest_x, dest_bottom = container.x + side * (container.width // 2 + OBJ // 2 + rng.uniform(4, 8)), BACK_Y
    elif kind == "held":
        dest_bottom = container.rim_y - rng.uniform(6, 14)

    start_x = rng.uniform(20, 76)
    grasp, lift, over, down = 4, 6, 9, 11
    released = kind not in ("held", "missed_grasp")
    end = (dest_x, dest_bottom) if kind == "held" else (dest_x + rng.uniform(-10, 10), 24 - rng.uniform(0, 8))
    keys = [(0, start_x, 16), (grasp - 1, target.x, target.bottom), (grasp, target.x, target.bottom),
            (lift, target.x, CARRY_Y), (over, dest_x, CARRY_Y), (down, dest_x, dest_bottom),
            (down + 1, dest_x, dest_bottom), (FRAMES - 1, *end)]
    occluder = rng.random() < 0.5
    occluder_from = (-12, SIZE + 12) if rng.random() < 0.5 else (SIZE + 12, -12)
    background = _background(rng, TABLE_Y)

    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
    for t in range(FRAMES):
        frame = background.copy()
        gx, gy = _path(keys, t)
        holding = grasp <= t and (t <= down or not released)
        if holding and kind != "missed_grasp":
            target.x, target.bottom = gx, gy
        elif t > down and released:
            target.x, target.bottom = dest_x, dest_bottom
        container.draw(frame)
        for o in objects:
            o.draw(frame)
        _draw_gripper(frame, gx, gy, closed=holding)
        if occluder and over <= t <= down + 2:  # a second arm sweeping in front of the container
            frac = (t - over) / (down + 2 - over)
            x = int(occluder_from[0] + frac * (occluder_from[1] - occluder_from[0]))
            cv2.rectangle(frame, (x - 10, 30), (x + 10, SIZE - 1), OCCLUDER, -1)
            cv2.rectangle(frame, (x - 3, 0), (x + 3, 30), OCCLUDER, -1)
        frames[t] = frame
    record = {"instruction": instruction, "label": "complete" if kind == "complete" else "not complete",
              "kind": kind, "occluded": bool(occluder)}
    return frames, record


# --- plausibility ------------------------------------------------------------------------------


def _ball_track(rng: np.random.Generator, score: int) -> list[tuple[float, float] | None] | None:
    """Ball centres per frame (None while it has vanished) for one draw of the physics, with the
    violation that `score` names; None when this draw would not show it clearly (the caller
    draws again).

    Integrated per frame; a ball that would pass the floor within a frame is shown touching it,
    so every bounce is visible at the frame it happens. Each violation lasts long enough to fill
    a whole pair of the frames a judge samples (`uniform:8` keeps every second or third frame and
    Qwen3-VL encodes them two by two), and never looks like plausible motion within one pair:
    the ball is dropped from rest, its bounces stay low, while it hovers and reverses only well
    above them.
    """
    floor = FLOOR_Y - BALL_RADIUS  # centre height of a ball resting on the floor
    margin = BALL_RADIUS + 3
    x, y = rng.uniform(18, 78), rng.uniform(14, 30)
    vx, vy = rng.uniform(-1.5, 1.5), rng.uniform(0, 1.5)
    g, bounce = rng.uniform(1.5, 2.5), rng.uniform(0.35, 0.5)
    onset = int(rng.integers(1, 6))  # earliest frame the violation may start
    event_at = contact_at = None
    hover_left = rise_left = vanished_left = 0
    sinking = False
    track: list[tuple[float, float] | None] = []
    for t in range(FRAMES):
        track.append(None if vanished_left else (x, y))
        vanished_left = max(0, vanished_left - 1)
        if hover_left:
            hover_left -= 1
            continue
        airborne = event_at is None and t >= onset and vy > 1 and floor - y > 25
        if score == 4 and airborne:
            hover_left, event_at = int(rng.integers(5, 7)), t
            continue
        if score == 3 and airborne and y > margin + 24:
            rise_left, event_at, vy = 6, t, -rng.uniform(3, 4)
        if score == 1 and event_at is None and t >= onset:  # gone from the next frame on, back elsewhere later
            dx = rng.choice([-1, 1]) * rng.uniform(30, 45)
            if not margin < x + dx < SIZE - margin:
                dx = -dx
            x, y = x + dx, float(np.clip(y + rng.uniform(-15, 15), 14, floor - 20))
            vanished_left, event_at = int(rng.integers(4, 6)), t
        x += vx
        if not margin < x < SIZE - margin:
            vx, x = -vx, float(np.clip(x, margin, SIZE - margin))
        if rise_left:  # lifted at a steady pace by a force from nowhere, then falls from rest
            rise_left -= 1
            y += vy
            vy = vy if rise_left else 0.0
            continue
        if sinking:  # into the floor at a steady pace until it is gone
            y += vy
            continue
        vy += g
        y += vy
        if y >= floor:
            y, contact_at = floor, t + 1 if contact_at is None else contact_at
            if score == 2:
                sinking, event_at, vy = True, t + 1, rng.uniform(4, 6)
            else:
                vy = -vy * bounce if vy * bounce > 2 * g else 0.0  # too slow to bounce visibly: rest
    last = FRAMES - 1
    if score == 5 and (contact_at is None or contact_at > last - 3):
        return None
    if score != 5 and (event_at is None or event_at > last - 7):
        return None
    return track


def _plausibility(rng: np.random.Generator, index: int) -> tuple[np.ndarray, dict]:
    score = 5 - index % 5
    while (track := _ball_track(rng, score)) is None:
        pass
    color = str(rng.choice(list(OBJECT_COLORS)))
    background = _background(rng, FLOOR_Y)
    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
    for t, centre in enumerate(track):
        frame = background.copy()
        if centre is not None:
            cv2.circle(frame, (int(round(centre[0])), int(round(centre[1]))), BALL_RADIUS, OBJECT_COLORS[color], -1,
                       cv2.LINE_AA)
        frame[FLOOR_Y:] = background[FLOOR_Y:]  # the floor hides whatever has sunk into it
        frames[t] = frame
    verb = str(rng.choice(["falls", "drops", "is dropped"]))
    centres = [None if c is None else [round(c[0], 1), round(c[1], 1)] for c in track]
    record = {"caption": f"A {color} ball {verb} onto the floor.", "score": score, "kind": PLAUSIBILITY_KINDS[score],
              "track": centres}
    return frames, record


# --- API ---------------------------------------------------------------------------------------


def make_clip(task: str, seed: int, index: int) -> tuple[np.ndarray, dict]:
    """Frames (FRAMES, SIZE, SIZE, 3) uint8 RGB and the record of clip `index` of split `seed`.

    The record holds the text the judge is given ("instruction" or "caption"), the answer
    ("label" or "score") and the scenario ("kind"); a completion record also says whether a
    second arm sweeps through ("occluded"), a plausibility record gives the ball's centre in
    every frame ("track": [x, y], or None while it has vanished).
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
