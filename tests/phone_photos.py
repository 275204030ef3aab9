"""Phone-style photos of handwritten digits, to test `predict_digit` and `read_number` on what users send.

The handwriting is the USPS test set (digits 0-999 of ../shared/usps/zip.test.gz, never MNIST), drawn as
ink on a notebook page and "photographed": each photo combines several of
  - paper: plain, ruled (faint blue lines a third to a half of the digit's height apart, sometimes a red
    margin line) or squared;
  - ink: blue ballpoint, black pen, grey pencil (low contrast, grainy), a thick marker, a thin pen;
  - the digit 15-50% of the frame's shorter side, anywhere in a frame of 160-4000 px, the dark table
    beyond the paper's edge along one side, a rotation of up to 15 degrees;
  - uneven light (a soft-edged shadow, or a brightness gradient of up to 60% across the frame), a little
    blur, sensor noise, JPEG at quality 60-90, RGB.
Rows: 3-5 digits written left to right on one line (varied gaps, wobbling baseline and size), same
conditions, labelled with the digit string. Everything is drawn from one seed, so a set is reproducible.

usage: python phone_photos.py OUT [--count 600] [--rows 200] [--seed 0]
       (USPS_ZIP=path/to/zip.test.gz to read the digits from elsewhere)
"""
import argparse, csv, gzip, io, os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

USPS_ZIP = Path(os.environ.get("USPS_ZIP", Path(__file__).resolve().parents[1] / ".." / "shared" / "usps" / "zip.test.gz"))
USPS_USED = 1000  # digits 0-999 of the USPS test set; the rest stay unseen
WORK_SIDE = 512  # pages are drawn at most this large, then enlarged to the frame: quick, and as soft as a phone
INKS = {  # name: (RGB colour, opacity range, stroke width change in units of the digit's height)
    "ballpoint": ((35, 55, 150), (0.75, 0.95), (-0.01, 0.015)),
    "black pen": ((25, 25, 30), (0.85, 1.0), (-0.01, 0.015)),
    "pencil": ((95, 95, 100), (0.35, 0.6), (-0.01, 0.01)),
    "marker": ((20, 20, 40), (0.9, 1.0), (0.01, 0.03)),
    "thin pen": ((30, 30, 60), (0.8, 1.0), (-0.035, -0.02)),
}

_digits = None


def usps_digits():
    """(labels, glyphs): the first USPS_USED USPS test digits, glyphs (N, 16, 16) with ink = 1, paper = 0."""
    global _digits
    if _digits is None:
        rows = np.loadtxt(gzip.open(USPS_ZIP))[:USPS_USED]
        _digits = rows[:, 0].astype(int), (rows[:, 1:].reshape(-1, 16, 16) + 1) / 2
    return _digits


def stroke(glyph, height, width, grow, rng):
    """The glyph at (height, width) px as ink opacity 0-1, its strokes grown (marker) or thinned (thin pen)."""
    big = np.asarray(Image.fromarray((glyph * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)) / 255
    ink = np.clip((big - 0.5) * 4 + 0.5, 0, 1)  # a crisp, anti-aliased edge halfway up the soft USPS stroke
    radius = int(round(abs(grow) * height))
    if radius:
        disk = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
        ink = (ndimage.grey_dilation if grow > 0 else ndimage.grey_erosion)(ink, footprint=disk)
        if grow < 0 and ink.max() < 0.5:  # thinned away: keep the unthinned strokes instead
            ink = np.clip((big - 0.5) * 4 + 0.5, 0, 1)
    return ink


def paper_page(h, w, line_gap, rng):
    """Reflectance (h, w, 3) in 0-1 of plain, ruled or squared paper; line_gap in px."""
    page = np.ones((h, w, 3), np.float32) * rng.uniform(0.85, 1.0) * rng.uniform([0.96, 0.96, 0.93], 1.0)
    kind = rng.choice(["plain", "ruled", "squared"], p=[0.3, 0.4, 0.3])
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]  # lines are straight on the page: 1-D profiles will do
    blue = np.array([0.55, 0.7, 0.95]) if rng.random() < 0.8 else np.array([0.7, 0.7, 0.7])
    thick, strength = max(0.7, line_gap / 25), rng.uniform(0.3, 0.7)

    def lines(coord, gap, colour, alpha):  # faint anti-aliased lines where coord is a multiple of gap
        near = np.abs((coord - rng.uniform(0, gap)) % gap - gap / 2)  # distance from the middle of two lines
        line = (np.clip(thick / 2 + 0.5 - (gap / 2 - near), 0, 1)[..., None] * alpha).astype(np.float32)
        return page * (1 - line) + colour * line

    if kind != "plain":
        page = lines(ys, line_gap, blue, strength)
    if kind == "squared":
        page = lines(xs, line_gap, blue, strength)
    if kind == "ruled" and rng.random() < 0.4:  # the red margin line, away from the digit
        x0 = rng.uniform(0.03, 0.12) * w if rng.random() < 0.5 else rng.uniform(0.88, 0.97) * w
        page = lines(xs - x0 + 2 * w, 4 * w, np.array([0.9, 0.45, 0.45]), 0.7)
    return page, kind


def photo(glyphs, rng, row=False):
    """One phone photo (PIL RGB, before JPEG) of the glyphs written side by side on a notebook page,
    and a note of its conditions ("ruled pencil table shadow 640x480")."""
    # Most frames are modest, a few are a full phone camera's size (the shorter side 160-3000 px).
    short = rng.choice([rng.uniform(160, 480), rng.uniform(480, 1200), rng.uniform(1200, 3000)], p=[0.85, 0.1, 0.05])
    aspect = rng.choice([1, 4 / 3, 16 / 9]) if not row else rng.choice([4 / 3, 16 / 9, 2])
    W, H = int(min(4000, short * aspect)), int(short)
    if not row and rng.random() < 0.5:
        W, H = H, W  # held upright
    scale = min(1.0, WORK_SIDE / max(W, H))
    w, h = max(1, round(W * scale)), max(1, round(H * scale))
    # The digits' height and their layout on one line.
    n = len(glyphs)
    digit_h = min(h, w) * (rng.uniform(0.15, 0.5) if not row else rng.uniform(0.15, 0.35))
    sizes = digit_h * rng.uniform(0.9, 1.1, n) if row else [digit_h]
    widths = [s * rng.uniform(0.65, 0.95) for s in sizes]
    gaps = rng.uniform(0.02, 0.35, n) * digit_h * (rng.random() > 0.2)  # a fifth of rows nearly touch
    total_w = sum(widths) + gaps[:-1].sum()
    if total_w > 0.85 * w:  # a long row in a narrow frame: write smaller
        shrink = 0.85 * w / total_w
        sizes, widths, gaps, total_w, digit_h = [s * shrink for s in sizes], [x * shrink for x in widths], gaps * shrink, 0.85 * w, digit_h * shrink
    # A page bigger than the frame, so that turning it leaves no empty corners.
    P = int(np.hypot(w, h)) + 4
    page, paper = paper_page(P, P, digit_h * rng.uniform(1 / 3, 1 / 2), rng)
    ink_name = rng.choice(list(INKS))
    notes = [paper, ink_name]  # what this photo has, for labels.csv
    colour, opacity, grow = INKS[ink_name]
    colour, grow = np.array(colour) / 255 * rng.uniform(0.8, 1.2), rng.uniform(*grow)
    ink = np.zeros((P, P), np.float32)
    x0 = (P - w) / 2 + rng.uniform(0.05 * w, max(0.05 * w, 0.95 * w - total_w))
    y0 = (P - h) / 2 + rng.uniform(0.05 * h, max(0.05 * h, 0.95 * h - max(sizes)))
    for glyph, gh, gw, gap in zip(glyphs, sizes, widths, gaps):
        g = stroke(glyph, max(4, round(gh)), max(3, round(gw)), grow, rng)
        top = int(y0 + (max(sizes) - gh) + rng.normal(0, 0.04) * digit_h)  # a wobbling baseline
        top = min(max(top, 0), P - g.shape[0])
        ink[top:top + g.shape[0], int(x0):int(x0) + g.shape[1]] = np.maximum(ink[top:top + g.shape[0], int(x0):int(x0) + g.shape[1]], g)
        x0 += gw + gap
    alpha = ink * np.float32(rng.uniform(*opacity))
    if ink_name == "pencil":  # graphite leaves a grainy trace
        alpha *= rng.uniform(0.6, 1.0, alpha.shape).astype(np.float32)
    page = page * (1 - alpha[..., None]) + colour.astype(np.float32) * alpha[..., None]
    # The table beyond the paper's edge, along one side of the frame.
    if rng.random() < 0.3:
        notes.append("table")
        edge = rng.uniform(0.02, 0.12)  # fraction of the frame that is table
        table = np.array([0.25, 0.17, 0.1]) * rng.uniform(0.3, 1.2) * rng.uniform(0.9, 1.1, 3)
        ys, xs = np.arange(P)[:, None], np.arange(P)[None, :]
        side_ = rng.integers(4)
        coord = [ys - (P - h) / 2, (P + h) / 2 - ys, xs - (P - w) / 2, (P + w) / 2 - xs][side_]
        reach = (h if side_ < 2 else w) * edge
        bbox = ink.nonzero()  # keep the table off the handwriting
        if len(bbox[0]):  # (a blank page has none)
            near = [bbox[0].min() - (P - h) / 2, (P + h) / 2 - bbox[0].max(), bbox[1].min() - (P - w) / 2, (P + w) / 2 - bbox[1].max()][side_]
            reach = min(reach, 0.8 * near)
        page = np.where((coord < reach)[..., None], (table * rng.uniform(0.8, 1.2, (P, P, 1))).astype(np.float32), page)
    # Turn the page by up to 15 degrees and cut the frame out of its middle.
    turned = Image.fromarray((np.clip(page, 0, 1) * 255).astype(np.uint8)).rotate(rng.uniform(-15, 15), Image.BILINEAR)
    img = np.asarray(turned.crop(((P - w) // 2, (P - h) // 2, (P - w) // 2 + w, (P - h) // 2 + h)), np.float32) / 255
    # Light: a brightness gradient of up to 60%, or a soft-edged shadow over part of the page.
    ys, xs = np.arange(h, dtype=np.float32)[:, None] / max(h, w), np.arange(w, dtype=np.float32)[None, :] / max(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    across = xs * np.cos(angle) + ys * np.sin(angle)
    across = (across - across.min()) / (np.ptp(across) + 1e-9)
    if rng.random() < 0.5:
        light = 1 - rng.uniform(0.1, 0.6) * across
        notes.append("gradient")
    else:
        notes.append("shadow")
        edge, soft = rng.uniform(0.2, 0.8), rng.uniform(0.02, 0.15)
        light = 1 - rng.uniform(0.3, 0.6) / (1 + np.exp((across - edge) / soft))
    img = img * light[..., None] * (rng.uniform(0.8, 1.05) * rng.uniform(0.95, 1.05, 3)).astype(np.float32)
    img = ndimage.gaussian_filter(img, (rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2), 0))  # a little blur
    img = img + rng.normal(0, rng.uniform(0.005, 0.03), img.shape).astype(np.float32)  # sensor noise
    out = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    notes.append(f"{W}x{H}")
    return (out.resize((W, H), Image.BICUBIC) if (W, H) != (w, h) else out), " ".join(notes)


def _jpeg(image, rng):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(rng.integers(60, 91)))
    return buf.getvalue()


def _photos(count, seed, row, blank=False):
    labels, glyphs = usps_digits()
    rng = np.random.default_rng([seed, row] + [2] * blank)
    for _ in range(count):
        picks = rng.integers(0, len(labels), rng.integers(3, 6) if row else 1)
        label = "".join(str(labels[i]) for i in picks) if row else int(labels[picks[0]])
        image, notes = photo(glyphs[picks] * (not blank), rng, row)
        yield _jpeg(image, rng), label, notes


def single_photos(count, seed=0):
    """`count` (PIL.Image, digit) pairs: phone photos of one USPS digit, JPEG-compressed."""
    for data, label, _ in _photos(count, seed, row=False):
        yield Image.open(io.BytesIO(data)), label


def row_photos(count, seed=0):
    """`count` (PIL.Image, digits as a str) pairs: phone photos of 3-5 USPS digits written on one line."""
    for data, label, _ in _photos(count, seed, row=True):
        yield Image.open(io.BytesIO(data)), label


def blank_photos(count, seed=0):
    """`count` PIL images: the same pages, light and tables as single_photos', with nothing written on them."""
    for data, _, _ in _photos(count, seed, row=False, blank=True):
        yield Image.open(io.BytesIO(data))


def write(folder, count=600, rows=200, seed=0):
    """Write count single-digit photos and `rows` row photos as JPEGs, with folder/labels.csv
    (file, label, conditions: the paper, ink, light, table and frame size of each photo)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "labels.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["file", "label", "conditions"])
        for kind, n in (("digit", count), ("row", rows)):
            for i, (data, label, notes) in enumerate(_photos(n, seed, row=kind == "row")):
                name = f"{kind}_{i:04d}_{label}.jpg"
                (folder / name).write_bytes(data)
                out.writerow([name, label, notes])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder for the JPEGs and labels.csv")
    parser.add_argument("--count", type=int, default=600, help="photos of one digit (default 600)")
    parser.add_argument("--rows", type=int, default=200, help="photos of a row of 3-5 digits (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    write(args.out, args.count, args.rows, args.seed)
    print(f"wrote {args.count} digit and {args.rows} row photos to {args.out}")
