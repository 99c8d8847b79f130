"""The pocket world's content: its vocabulary, scenes (objects on a 3x3 grid and their events), rendering and
captions. :mod:`vidret.data.pocket` draws from these to write the world; the rules (static clause + event clause,
reversal-symmetric scenes, intra-only frames) are described there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

CAPTION_TOKENS = 48  # every video caption fits in this many tokens with SOT/EOT (redrawn otherwise): max_words

if TYPE_CHECKING:
    from vidret.data.pocket import PocketConfig


# --------------------------------------------------------------------------- vocabulary

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (40, 180, 60),
    "blue": (45, 90, 225),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}


def _w(options: str) -> list[str]:
    """Word lists are written as "a|b|c" to keep the vocabulary compact."""
    return options.split("|")


_COLOUR_WORDS = {
    "red": _w("red|crimson|scarlet"),
    "green": _w("green|emerald"),
    "blue": _w("blue|azure|cobalt"),
    "yellow": _w("yellow|golden|lemon"),
    "purple": _w("purple|violet"),
    "white": _w("white|snow-white"),
}
_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
_SHAPE_WORDS = {
    "circle": _w("circle|disk|dot|ball"),
    "square": _w("square|box|block"),
    "triangle": _w("triangle|triangle shape"),
    "diamond": _w("diamond|rhombus|lozenge"),
    "cross": _w("cross|plus sign|plus"),
}
_SIZE_WORDS = {False: _w("small|tiny|little"), True: _w("large|big|huge")}
_MOVE_WORDS = {
    "right": _w("moves right|moves to the right|slides right|goes right|drifts to the right|travels rightwards"),
    "left": _w("moves left|moves to the left|slides left|goes left|drifts to the left|travels leftwards"),
    "up": _w("moves up|moves upwards|rises|goes up|slides up|climbs|drifts upward"),
    "down": _w("moves down|moves downwards|falls|goes down|slides down|drops|sinks"),
}
_EVENT_WORDS = {
    "grow": _w("grows|gets bigger|expands|grows larger|becomes bigger|increases in size"),
    "shrink": _w("shrinks|gets smaller|contracts|becomes smaller|decreases in size|dwindles"),
    "appear": _w("appears|shows up|pops up|comes into view|emerges|pops into view"),
    "disappear": _w("disappears|vanishes|goes away|disappears from view|vanishes from sight|pops out of view"),
    "recolour": _w("turns {c}|becomes {c}|changes colour to {c}|changes color to {c}|switches to {c}"),
}
_EVENT_WORDS["recolour"].append("changes from {c0} to {c}")
_ONE_EVENT = _w("{a}|in this clip, {a}|a clip where {a}|we see that {a}|here {a}")
# (template, True when the later event is written first): word order must not give time order away
_TWO_EVENTS = [(t, False) for t in _w("{a}, then {b}|{a}, and then {b}|first {a}, then {b}|{a}; after that, {b}")]
_TWO_EVENTS += [(t, False) for t in _w("{a}, and afterwards {b}|{a} before {b}|after {a}, {b}")]
_TWO_EVENTS += [(t, True) for t in _w("{b} after {a}|before {b}, {a}|{b}, but first {a}|{b}; earlier, {a}")]
_STATIC_ONE = _w("{o}|a picture of {o}|an image of {o}|there is {o}|{o} on a dark background|a frame showing {o}")
_STATIC_TWO = _w("{o1} and {o2}|there is {o1} and {o2}|a picture of {o1} and {o2}|{o1} together with {o2}")
_STATIC_TWO += _w("{o1} as well as {o2}|an image of {o1} and {o2}")
# video caption = static clause (the first frame, as a pretraining caption) + event clause
_JOINS = _w("{s}; {e}|{s}. {e}|{s}: {e}|{s}, and {e}")
_OPPOSITE = {"right": "left", "up": "down", "grow": "shrink", "appear": "disappear"}
_OPPOSITE.update({v: k for k, v in _OPPOSITE.items()})
_DIRS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _position_phrase(row: int, col: int, rng: np.random.Generator) -> str:
    if row != 1 and col != 1:
        v = _pick(rng, ["top", "upper"] if row == 0 else ["bottom", "lower"])
        h = COLS[col]
        return _pick(rng, [f"in the {v} {h}", f"at the {v} {h}", f"in the {v}-{h} corner", f"in the {v} {h} corner"])
    if row != 1:
        v, v2 = ("top", "upper") if row == 0 else ("bottom", "lower")
        return _pick(
            rng, [f"at the {v}", f"in the {v} middle", f"at the {v} centre", f"near the {v}", f"in the {v2} middle"]
        )
    if col != 1:
        h = COLS[col]
        return _pick(rng, [f"on the {h}", f"at the {h}", f"in the middle {h}", f"on the {h} side"])
    return _pick(rng, ["in the centre", "in the center", "in the middle", "at the centre"])


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """An object's state; ``size`` is in pixels, (x, y) its centre in pixels."""

    shape: str
    colour: str
    size: float
    present: bool
    x: float = 0.0
    y: float = 0.0


@dataclass(frozen=True)
class Event:
    obj: int  # index into the scene's objects
    kind: str  # move | grow | shrink | appear | disappear | recolour
    arg: str = ""  # move: direction; recolour: the new colour
    dist: float = 0.0  # move: distance in pixels


def object_sizes(s: int) -> tuple[float, float]:
    """(small, large) object extent in pixels: 10 and 18 at 64x64."""
    return round(0.16 * s), round(0.28 * s)


def _apply(o: Obj, e: Event, p: float, s: int) -> Obj:
    """State of ``o`` after event ``e`` has progressed by ``p`` in [0, 1]; p = 0 is the identity."""
    small, large = object_sizes(s)
    if e.kind == "move":
        dx, dy = _DIRS[e.arg]
        return replace(o, x=o.x + dx * e.dist * p, y=o.y + dy * e.dist * p)
    if e.kind == "grow":
        return replace(o, size=small + (large - small) * p)
    if e.kind == "shrink":
        return replace(o, size=large - (large - small) * p)
    # Discrete changes happen at mid-event (for T a multiple of 4 no frame sits exactly there).
    if e.kind == "appear":
        return replace(o, present=p >= 0.5)
    if e.kind == "disappear":
        return replace(o, present=p < 0.5)
    if e.kind == "recolour":
        return replace(o, colour=e.arg if p >= 0.5 else o.colour)
    raise AssertionError(e.kind)


def _start_states(objs: list[Obj], events: list[Event], s: int) -> tuple[list[list[Obj]], list[Obj]]:
    """Objects at the start of each event, and at the end of the clip."""
    cur = list(objs)
    starts = []
    for e in events:
        starts.append(list(cur))
        cur[e.obj] = _apply(cur[e.obj], e, 1.0, s)
    return starts, cur


def reverse_scene(objs: list[Obj], events: list[Event], s: int) -> tuple[list[Obj], list[Event]]:
    """The scene played backwards: starts in the final state, inverse events in reverse order."""
    starts, final = _start_states(objs, events, s)
    rev = []
    for e, st in zip(reversed(events), reversed(starts)):
        if e.kind == "recolour":
            rev.append(replace(e, arg=st[e.obj].colour))
        else:
            rev.append(replace(e, kind=_OPPOSITE.get(e.kind, e.kind), arg=_OPPOSITE.get(e.arg, e.arg)))
    return final, rev


def _symbolic(e: Event) -> tuple[int, str, str]:
    return (e.obj, e.kind, e.arg)


def sample_scene(rng: np.random.Generator, cfg: PocketConfig) -> tuple[list[Obj], list[Event]]:
    """A random event scene, reversal-symmetric in distribution and never a palindrome."""
    s = cfg.image_size
    small, large = object_sizes(s)
    while True:
        n_obj = 2 if rng.random() < cfg.two_object_prob else 1
        n_ev = 2 if rng.random() < cfg.two_event_prob else 1
        shapes = rng.choice(len(_SHAPES), size=n_obj, replace=False)
        colours = rng.choice(len(_COLOURS), size=n_obj, replace=False)
        sizes = [float(large if rng.random() < 0.5 else small) for _ in range(n_obj)]
        present = [bool(rng.random() >= 0.25) for _ in range(n_obj)]
        objs = [Obj(_SHAPES[sh], list(_COLOURS)[c], z, p) for sh, c, z, p in zip(shapes, colours, sizes, present)]
        cur = list(objs)
        events: list[Event] = []
        for _ in range(n_ev):
            i = int(rng.integers(n_obj))
            o = cur[i]
            if not o.present:
                e = Event(i, "appear")
            else:
                kind = _pick(rng, ["move", "size", "disappear", "recolour"])
                if kind == "move":
                    e = Event(i, "move", _pick(rng, list(_DIRS)), s / 3)  # one grid cell
                elif kind == "size":
                    e = Event(i, "shrink" if o.size >= large else "grow")
                elif kind == "recolour":
                    # a colour no object has, so "the <colour> <shape>" stays unambiguous
                    taken = {c.colour for c in cur}
                    e = Event(i, "recolour", _pick(rng, [c for c in _COLOURS if c not in taken]))
                else:
                    e = Event(i, "disappear")
            if events and _symbolic(events[-1]) == _symbolic(e):
                continue  # "moves right, then moves right" is one longer move, not two events
            events.append(e)
            cur[i] = _apply(o, e, 1.0, s)
        if len(events) < n_ev:
            continue
        # an object that starts absent and never appears would be invisible: make it a static one
        touched = {e.obj for e in events}
        objs = [o if o.present or i in touched else replace(o, present=True) for i, o in enumerate(objs)]
        if rng.random() < 0.5:  # makes P(scene) == P(reversed scene): twins are in-distribution
            objs, events = reverse_scene(objs, events, s)
        if [_symbolic(e) for e in reverse_scene(objs, events, s)[1]] == [_symbolic(e) for e in events]:
            continue  # a palindrome ("grows, then shrinks") looks the same backwards
        if not any(o.present for o in objs) or not any(o.present for o in _start_states(objs, events, s)[1]):
            continue  # an empty first (or, for the twin, last) frame has no static clause; symmetric, so fair
        placed = _place(rng, objs, events, s)
        if placed is None:
            continue  # the moves do not fit on the grid from any start cells
        return placed, events


def _place(rng: np.random.Generator, objs: list[Obj], events: list[Event], s: int) -> list[Obj] | None:
    """Start every object near the centre of a 3x3 grid cell (as in the pretraining images); None if no fit.

    A move is exactly one cell, so an object also ends near a cell centre and the last frame (the twin's first)
    is as pretraining-like as the first. The cells each object visits stay on the grid and apart from the other
    object's cells. The jitter is the pretraining images' (+-5% of the frame), clamped to keep the whole
    trajectory in frame.
    """
    _, large = object_sizes(s)
    cell = s / 3
    paths: list[list[tuple[int, int]]] = []  # per object: (row, col) offsets of the cells it visits
    for i in range(len(objs)):
        path = [(0, 0)]
        for e in events:
            if e.obj == i and e.kind == "move":
                dx, dy = _DIRS[e.arg]
                path.append((path[-1][0] + int(dy), path[-1][1] + int(dx)))
        paths.append(path)
    starts: list[tuple[int, int]] = []
    for _ in range(50):
        starts = []
        for path in paths:
            rows = [r for r in range(3) if all(0 <= r + dr < 3 for dr, _ in path)]
            cols = [c for c in range(3) if all(0 <= c + dc < 3 for _, dc in path)]
            if not rows or not cols:
                return None
            starts.append((_pick(rng, rows), _pick(rng, cols)))  # type: ignore[arg-type]
        visited = [{(r + dr, c + dc) for dr, dc in path} for (r, c), path in zip(starts, paths)]
        if len(visited) < 2 or not visited[0] & visited[1]:
            break
    else:
        return None
    placed = []
    for i, (o, (row, col), path) in enumerate(zip(objs, starts, paths)):
        grows = o.size >= large or any(e.obj == i and e.kind == "grow" for e in events)
        half = (large if grows else o.size) / 2 + 1.0
        jitter = 0.05 * s
        cx = (col + 0.5) * cell + float(rng.uniform(-jitter, jitter))
        cy = (row + 0.5) * cell + float(rng.uniform(-jitter, jitter))
        lo_x, hi_x = min(dc for _, dc in path) * cell, max(dc for _, dc in path) * cell
        lo_y, hi_y = min(dr for dr, _ in path) * cell, max(dr for dr, _ in path) * cell
        cx = min(max(cx, half - lo_x), s - half - hi_x)
        cy = min(max(cy, half - lo_y), s - half - hi_y)
        placed.append(replace(o, x=cx, y=cy))
    return placed


def cell_of(o: Obj, s: int) -> tuple[int, int]:
    """The (row, col) grid cell holding an object's centre."""
    return min(max(int(o.y * 3 // s), 0), 2), min(max(int(o.x * 3 // s), 0), 2)


def sample_static(rng: np.random.Generator, cfg: PocketConfig) -> tuple[list[Obj], list[tuple[int, int]]]:
    """1-2 objects on the 3x3 grid (distinct cells); returns objects and their (row, col) cells."""
    s = cfg.image_size
    small, large = object_sizes(s)
    n_obj = 2 if rng.random() < cfg.two_object_prob else 1
    cells = [divmod(int(c), 3) for c in rng.choice(9, size=n_obj, replace=False)]
    objs = []
    for row, col in cells:
        size = float(large if rng.random() < 0.5 else small)
        jitter = 0.05 * s
        cx = (col + 0.5) * s / 3 + float(rng.uniform(-jitter, jitter))
        cy = (row + 0.5) * s / 3 + float(rng.uniform(-jitter, jitter))
        half = size / 2 + 1.0
        cx, cy = min(max(cx, half), s - half), min(max(cy, half), s - half)
        objs.append(Obj(_pick(rng, _SHAPES), _pick(rng, list(_COLOURS)), size, True, cx, cy))
    return objs, cells


# --------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Inside-test at offsets (dx, dy) from the centre for an object of extent ``size`` px."""
    r = size / 2
    if shape == "circle":
        return np.asarray(dx * dx + dy * dy <= r * r)
    if shape == "square":
        return np.asarray(np.maximum(np.abs(dx), np.abs(dy)) <= 0.9 * r)
    if shape == "triangle":  # apex up, base at the bottom
        return np.asarray((dy <= r) & (np.abs(dx) <= (dy + r) / 2))
    if shape == "diamond":
        return np.asarray(np.abs(dx) + np.abs(dy) <= r)
    if shape == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        t = size / 6
        return np.asarray(((ax <= t) & (ay <= r)) | ((ay <= t) & (ax <= r)))
    raise AssertionError(shape)


def render(objs: list[Obj], bg: int, s: int) -> np.ndarray:
    """Draw objects over a flat grey background, 2x2 supersampled; returns uint8 [S, S, 3]."""
    img = np.full((s, s, 3), float(bg), dtype=np.float32)
    sub = np.array([0.25, 0.75], dtype=np.float32)
    for o in objs:
        if not o.present:
            continue
        r = o.size / 2 + 1
        x0, x1 = max(int(np.floor(o.x - r)), 0), min(int(np.ceil(o.x + r)), s)
        y0, y1 = max(int(np.floor(o.y - r)), 0), min(int(np.ceil(o.y + r)), s)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + sub).ravel() - o.x  # [2W]
        ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + sub).ravel() - o.y  # [2H]
        inside = _shape_mask(o.shape, xs[None, :], ys[:, None], o.size)  # [2H, 2W]
        cover = inside.reshape(y1 - y0, 2, x1 - x0, 2).sum(axis=(1, 3), dtype=np.float32) * 0.25  # -> [H, W]
        col = np.array(_COLOURS[o.colour], dtype=np.float32)
        win = img[y0:y1, x0:x1]
        win += cover[..., None] * (col - win)
    return np.rint(img).astype(np.uint8)  # blends of values in [0, 255] stay in range


def render_clip(objs: list[Obj], events: list[Event], bg: int, cfg: PocketConfig) -> np.ndarray:
    """uint8 [T, S, S, 3]; event k of n runs over [k/n, (k+1)/n] of a timeline sampled at (t+0.5)/T.

    The sample times are symmetric about 1/2, so the reversed clip is exactly the clip the reversed
    scene would render.
    """
    t_, s, n = cfg.frames, cfg.image_size, max(len(events), 1)
    out = np.empty((t_, s, s, 3), dtype=np.uint8)
    for t in range(t_):
        u = (t + 0.5) / t_
        cur = list(objs)
        for k, e in enumerate(events):
            p = min(max((u - k / n) * n, 0.0), 1.0)
            cur[e.obj] = _apply(cur[e.obj], e, p, s)
        out[t] = render(cur, bg, s)
    return out


# --------------------------------------------------------------------------- captions


def _noun(o: Obj, rng: np.random.Generator, s: int) -> str:
    """Size, colour and shape words of an object (each drawn from its synonyms)."""
    words = [_pick(rng, _SIZE_WORDS[o.size >= object_sizes(s)[1]])]
    words += [_pick(rng, _COLOUR_WORDS[o.colour]), _pick(rng, _SHAPE_WORDS[o.shape])]
    return " ".join(words)


def _event_clause(objs: list[Obj], events: list[Event], rng: np.random.Generator, s: int, mentioned: set[int]) -> str:
    """What happens, in order; objects the static clause named (``mentioned``) are "the <shape>"."""
    starts, _ = _start_states(objs, events, s)
    if len(events) == 1:
        template, later_first = _pick(rng, _ONE_EVENT), False
    else:
        template, later_first = _TWO_EVENTS[int(rng.integers(len(_TWO_EVENTS)))]
    order = list(range(len(events)))[::-1] if later_first else list(range(len(events)))
    mentioned = set(mentioned)
    clauses: dict[int, str] = {}
    for k in order:  # surface order decides "a" vs "the"
        e, o = events[k], starts[k][events[k].obj]
        if e.obj in mentioned:
            shape = _pick(rng, _SHAPE_WORDS[o.shape])
            subject = f"the {shape}" if rng.random() < 0.5 else f"the {_pick(rng, _COLOUR_WORDS[o.colour])} {shape}"
        else:  # not in the first frame (it appears later): introduced in full, in the pretraining's words
            noun = _noun(o, rng, s)
            subject = f"{_article(noun)} {noun}"
        mentioned.add(e.obj)
        if e.kind == "move":
            verb = _pick(rng, _MOVE_WORDS[e.arg])
        else:
            verb = _pick(rng, _EVENT_WORDS[e.kind])
            if e.kind == "recolour":
                verb = verb.format(c=_pick(rng, _COLOUR_WORDS[e.arg]), c0=_pick(rng, _COLOUR_WORDS[o.colour]))
        clauses[k] = f"{subject} {verb}"
    return template.format(a=clauses[0], b=clauses.get(1, ""))


def video_caption(objs: list[Obj], events: list[Event], rng: np.random.Generator, s: int) -> tuple[str, str]:
    """(caption, its static clause): the first frame in the pretraining's own words, then the event clause."""
    present = [i for i, o in enumerate(objs) if o.present]
    static = static_caption([objs[i] for i in present], [cell_of(objs[i], s) for i in present], rng, s)
    events_text = _event_clause(objs, events, rng, s, set(present))
    return _pick(rng, _JOINS).format(s=static, e=events_text), static


def static_caption(objs: list[Obj], cells: list[tuple[int, int]], rng: np.random.Generator, s: int) -> str:
    phrases = []
    for o, (row, col) in zip(objs, cells):
        size = _pick(rng, _SIZE_WORDS[o.size >= object_sizes(s)[1]])
        colour, shape = _pick(rng, _COLOUR_WORDS[o.colour]), _pick(rng, _SHAPE_WORDS[o.shape])
        pos = _position_phrase(row, col, rng)
        form = int(rng.integers(4))
        if form <= 1:
            phrases.append(f"{_article(size)} {size} {colour} {shape} {pos}")
        elif form == 2:
            coloured = _pick(rng, ["coloured", "colored"])
            phrases.append(f"{_article(size)} {size} {shape} {coloured} {colour} {pos}")
        else:
            phrases.append(f"{_article(colour)} {colour} {shape} that is {size}, {pos}")
    if len(phrases) == 1:
        return _pick(rng, _STATIC_ONE).format(o=phrases[0])
    if rng.random() < 0.5:
        phrases.reverse()
    return _pick(rng, _STATIC_TWO).format(o1=phrases[0], o2=phrases[1])


def draw_captions(
    make: Callable[[np.random.Generator], tuple[str, str]], seeds: list[list[int]], n: int
) -> tuple[list[str], list[str]]:
    """``n`` distinct (caption, static clause) pairs, the k-th drawn from its own rng (a twin shares the phrasing)."""
    from vidret.backbone.tokenizer import default_tokenizer

    tok = default_tokenizer()
    out: list[str] = []
    statics: list[str] = []
    for k in range(n):
        rng = np.random.default_rng(seeds[k])
        for _ in range(20):
            c, st = make(rng)
            # distinct, and whole within CAPTION_TOKENS: truncation would cut the event clause off
            if c not in out and len(tok.encode(c)) + 2 <= CAPTION_TOKENS:
                break
        out.append(c)
        statics.append(st)
    return out, statics
