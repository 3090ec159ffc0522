"""The built-in default dataset: synthetic class-labelled JPEGs mixed with real English text windows.

NOTE [builtin images]: the class of an image decides both a dominant hue (class / 10 on the hue circle) and a
shape or pattern, drawn at a random position and scale over a noisy, low-saturation background. Either cue alone
survives a resize to 32 px, so a small ViT learns the classes quickly, yet the image is not a constant per
class. Sizes are log-uniform between ``min_side`` and ``max_side`` with aspect ratios from 1:2 to 2:1, like a
web crawl.

NOTE [builtin texts]: texts are contiguous word windows of Python's own documentation
(``pydoc_data.topics``, about 65k English words). Lengths are lognormal (median ``text_len_median`` words,
``text_len_sigma`` in log space), clipped to [5, 512] words: mostly caption-sized, with a long tail that
exercises padding.

NOTE [builtin seeds]: sample ``i`` draws from its own generator ``default_rng([SAMPLE_STREAM, seed, i])``, so a
sample does not depend on the samples before it; the modality order comes from a separate stream. The stream tag
comes first because numpy's SeedSequence gives ``[s]`` and ``[s, 0]`` the same state.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

# Bump when the generator's output changes, so cached shards (make_shards.cached_builtin_shards) are rebuilt.
GENERATOR_VERSION = 1
CLASS_NAMES = ("circle", "square", "hstripes", "vstripes", "checker", "diagonal", "ring", "triangle", "cross",
               "dots")
MIN_TEXT_WORDS, MAX_TEXT_WORDS = 5, 512
JPEG_QUALITY = 85
NOISE_AMPLITUDE = 24  # +- per channel, uint8 scale

ORDER_STREAM, NOISE_STREAM, SAMPLE_STREAM = 0, 1, 2


@functools.lru_cache(maxsize=1)
def pydoc_corpus() -> tuple[str, ...]:
    """The topic texts of ``pydoc_data.topics``, in sorted topic order (deterministic across runs)."""
    from pydoc_data.topics import topics

    return tuple(topics[name] for name in sorted(topics))


@functools.lru_cache(maxsize=1)
def _pydoc_words() -> tuple[str, ...]:
    return tuple(" ".join(pydoc_corpus()).split())


def builtin_records(
    samples: int,
    seed: int,
    image_text_ratio: float = 8.0,
    min_side: int = 64,
    max_side: int = 800,
    text_len_median: float = 48,
    text_len_sigma: float = 0.9,
) -> Iterator[dict]:
    """Yield ``samples`` writer records (see ``mmload.shards.writer``): images and texts, unpaired.

    ``image_text_ratio`` images per text (8.0: 8 images for 1 text; 0: texts only; ``inf``: images only); the
    text count is ``round(samples / (ratio + 1))`` exactly and the order is shuffled by ``seed``.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not image_text_ratio >= 0:  # also refuses NaN
        raise ValueError(f"image_text_ratio must be >= 0 (images per text; inf for images only), "
                         f"got {image_text_ratio}")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    if text_len_median <= 0 or text_len_sigma < 0:
        raise ValueError(f"need text_len_median > 0 and text_len_sigma >= 0, got {text_len_median}, "
                         f"{text_len_sigma}")
    n_text = round(samples / (image_text_ratio + 1))
    is_text = np.zeros(samples, dtype=bool)
    is_text[:n_text] = True
    is_text = np.random.default_rng([ORDER_STREAM, seed]).permutation(is_text)
    noise = np.random.default_rng([NOISE_STREAM, seed]).integers(
        -NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(max_side, max_side, 3), dtype=np.int16)
    return _generate(is_text, seed, noise, min_side, max_side, text_len_median, text_len_sigma)


def _generate(is_text: np.ndarray, seed: int, noise: np.ndarray, min_side: int, max_side: int,
              text_len_median: float, text_len_sigma: float) -> Iterator[dict]:
    for i, text in enumerate(is_text.tolist()):
        rng = np.random.default_rng([SAMPLE_STREAM, seed, i])
        key = f"{i:09d}"
        if text:
            text, n_words = _text_window(rng, text_len_median, text_len_sigma)
            yield {"__key__": key, "txt": text, "json": {"modality": "text", "num_words": n_words}}
        else:
            label = int(rng.integers(len(CLASS_NAMES)))
            jpg, (w, h) = _image(rng, label, noise, min_side, max_side)
            meta = {"modality": "image", "width": w, "height": h, "class_name": CLASS_NAMES[label]}
            yield {"__key__": key, "jpg": jpg, "cls": label, "json": meta}


def _text_window(rng: np.random.Generator, median: float, sigma: float) -> tuple[str, int]:
    words = _pydoc_words()
    n = int(np.clip(round(median * math.exp(sigma * rng.standard_normal())), MIN_TEXT_WORDS, MAX_TEXT_WORDS))
    start = int(rng.integers(len(words) - n + 1))
    return " ".join(words[start:start + n]), n


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _image(rng: np.random.Generator, label: int, noise: np.ndarray, min_side: int,
           max_side: int) -> tuple[bytes, tuple[int, int]]:
    side = math.exp(rng.uniform(math.log(min_side), math.log(max_side + 1)))
    aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
    w = int(np.clip(side * math.sqrt(aspect), min_side, max_side))
    h = int(np.clip(side / math.sqrt(aspect), min_side, max_side))
    fg = _rgb(label / len(CLASS_NAMES) + rng.uniform(-0.03, 0.03), rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    bg = _rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.15, 0.85))
    img = Image.new("RGB", (w, h), bg)
    s = rng.uniform(0.45, 0.9) * min(w, h)  # shape's bounding square
    x0, y0 = rng.uniform(0, w - s), rng.uniform(0, h - s)
    _draw_shape(ImageDraw.Draw(img), CLASS_NAMES[label], x0, y0, s, fg, int(rng.integers(3, 6)))
    oy, ox = int(rng.integers(max_side - h + 1)), int(rng.integers(max_side - w + 1))
    pixels = np.asarray(img, dtype=np.int16) + noise[oy:oy + h, ox:ox + w]  # (h, w, 3)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), (w, h)


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, x0: float, y0: float, s: float,
                fill: tuple[int, int, int], k: int) -> None:
    """Draw class ``name`` inside the square (x0, y0, x0 + s, y0 + s); ``k`` in 3..5 sets the pattern density."""
    x1, y1, step = x0 + s, y0 + s, s / (2 * k - 1)  # k bars and k - 1 gaps
    if name == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif name == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif name == "hstripes":
        for j in range(k):
            draw.rectangle((x0, y0 + 2 * j * step, x1, y0 + (2 * j + 1) * step), fill=fill)
    elif name == "vstripes":
        for j in range(k):
            draw.rectangle((x0 + 2 * j * step, y0, x0 + (2 * j + 1) * step, y1), fill=fill)
    elif name == "checker":
        cell = s / k
        for r in range(k):
            for c in range(r % 2, k, 2):
                draw.rectangle((x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell, y0 + (r + 1) * cell), fill=fill)
    elif name == "diagonal":
        for j in range(-(k // 2), k // 2 + 1):  # parallel bands along the main diagonal
            d = j * s / k
            draw.line((x0 + max(d, 0), y0 + max(-d, 0), x1 - max(-d, 0), y1 - max(d, 0)), fill=fill,
                      width=max(1, round(s / (2.5 * k))))
    elif name == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(1, round(s / 6)))
    elif name == "triangle":
        draw.polygon(((x0 + s / 2, y0), (x1, y1), (x0, y1)), fill=fill)
    elif name == "cross":
        a, b = s * 3 / 8, s * 5 / 8
        draw.rectangle((x0 + a, y0, x0 + b, y1), fill=fill)
        draw.rectangle((x0, y0 + a, x1, y0 + b), fill=fill)
    elif name == "dots":
        r = s / (2 * k) * 0.7
        for cy in range(k):
            for cx in range(k):
                px, py = x0 + (cx + 0.5) * s / k, y0 + (cy + 0.5) * s / k
                draw.ellipse((px - r, py - r, px + r, py + r), fill=fill)
    else:
        raise ValueError(f"unknown builtin class {name!r}; expected one of {CLASS_NAMES}")
