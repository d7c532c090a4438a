"""The visual report of stage 04: each query crop beside its 5 ranked candidates.

A candidate tile shows a gallery crop of the predicted individual (its best-matching image), the
id and the score, and after local-feature re-ranking the inlier count of its best-verified photo
(the marks that one transform maps onto the query's); `new_individual` is a labelled grey tile.
When the answer is known the tile of the true id is framed green and the others red. Two files:
`contact_sheet.png` (composed with OpenCV, no display needed) and `report.html` (thumbnails
embedded as base64, so the page still works when copied elsewhere alone).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from whaleid.images import read_image, resize_square, write_jpeg
from whaleid.io import write_bytes, write_text

GREEN = (40, 170, 60)
RED = (215, 50, 40)
GREY = (150, 150, 150)
BLUE = (40, 110, 220)
WHITE = (255, 255, 255)
NEW_TILE = (70, 70, 80)
MISSING_TILE = (215, 215, 215)
FONT = cv2.FONT_HERSHEY_SIMPLEX
BORDER = 5
PAD = 6
CAPTION = 49
HEADER = 26


@dataclass
class Tile:
    """One candidate: its id, score, a crop to show (None: a labelled placeholder) and correctness
    (None when the answer is unknown)."""

    label: str
    score: float | None
    path: str | None
    correct: bool | None = None
    inliers: int | None = None  # local-feature re-ranking evidence (None: not re-ranked)


@dataclass
class QueryRow:
    """A query crop, its true id when known, and its ranked candidates."""

    image: str
    path: str | None
    truth: str | None = None
    tiles: list[Tile] = field(default_factory=list)


def _frame_colour(correct: bool | None) -> tuple[int, int, int]:
    return GREY if correct is None else (GREEN if correct else RED)


def _thumbnail(path: str | None, size: int, placeholder: str) -> np.ndarray:
    """The crop at `path` as a size x size RGB tile, or a grey tile with `placeholder` written on it."""
    rgb = read_image(path)[0] if path else None
    if rgb is not None:
        return resize_square(rgb, size)
    missing = placeholder == "missing"
    tile = np.full((size, size, 3), MISSING_TILE if missing else NEW_TILE, dtype=np.uint8)
    ink = (60, 60, 60) if missing else WHITE
    words = placeholder.replace("_", " ").split() or ["?"]
    for i, word in enumerate(words):
        (w, h), _ = cv2.getTextSize(word, FONT, 0.5, 1)
        y = size // 2 + (i - (len(words) - 1) / 2) * (h + 8) + h // 2
        cv2.putText(tile, word, ((size - w) // 2, int(y)), FONT, 0.5, ink, 1, cv2.LINE_AA)
    return tile


def _fit(text: str, width: int, scale: float = 0.38) -> str:
    """`text` cut (with '..') so it fits `width` pixels at this font scale."""
    while text and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width:
        text = text[:-3] + ".." if len(text) > 3 else text[:-1]
    return text


def _cell(thumb: np.ndarray, colour: tuple[int, int, int], lines: list[str]) -> np.ndarray:
    """A framed thumbnail with up to three caption lines below it, on white."""
    size = thumb.shape[0]
    w = size + 2 * BORDER
    cell = np.full((w + CAPTION, w, 3), 255, dtype=np.uint8)
    cell[:w, :w] = colour
    cell[BORDER:BORDER + size, BORDER:BORDER + size] = thumb
    for i, line in enumerate(lines[:3]):
        cv2.putText(cell, _fit(line, w - 2), (2, w + 13 + 15 * i), FONT, 0.38, (20, 20, 20), 1, cv2.LINE_AA)
    return cell


def _score_text(score: float | None) -> str:
    return "" if score is None or not np.isfinite(score) else f"score {score:.3f}"


def _tile_lines(tile: Tile) -> list[str]:
    """Caption lines of a candidate: id, score, and the re-ranking inliers when there are any."""
    lines = [tile.label, _score_text(tile.score)]
    if tile.inliers is not None:
        lines.append(f"{tile.inliers} inliers")
    return lines


def _row_cells(row: QueryRow, size: int) -> list[np.ndarray]:
    query = _cell(_thumbnail(row.path, size, "missing"), BLUE,
                  [f"Q {row.image}", f"truth {row.truth}" if row.truth else "truth unknown"])
    cells = [query]
    for tile in row.tiles:
        placeholder = tile.label if tile.path is None else "missing"
        cells.append(_cell(_thumbnail(tile.path, size, placeholder), _frame_colour(tile.correct),
                           _tile_lines(tile)))
    return cells


def contact_sheet(rows: list[QueryRow], size: int = 128, n_candidates: int = 5) -> np.ndarray:
    """One RGB image: a header, then per query the query cell and its candidate cells."""
    cell_h, cell_w = size + 2 * BORDER + CAPTION, size + 2 * BORDER
    cols = 1 + n_candidates
    sheet = np.full((HEADER + len(rows) * (cell_h + PAD) + PAD, cols * (cell_w + PAD) + PAD, 3), 255, np.uint8)
    for c, title in enumerate(["query"] + [f"rank {i + 1}" for i in range(n_candidates)]):
        cv2.putText(sheet, title, (PAD + c * (cell_w + PAD), 18), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for r, row in enumerate(rows):
        y = HEADER + PAD + r * (cell_h + PAD)
        for c, cell in enumerate(_row_cells(row, size)[:cols]):
            x = PAD + c * (cell_w + PAD)
            sheet[y:y + cell_h, x:x + cell_w] = cell
    return sheet


def _data_uri(path: str | None, size: int, placeholder: str) -> str:
    jpeg = write_jpeg(path or placeholder, _thumbnail(path, size, placeholder), quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _html_cell(path: str | None, colour: tuple[int, int, int], lines: list[str], size: int, placeholder: str) -> str:
    rgb = "rgb({},{},{})".format(*colour)
    caption = "<br>".join(html.escape(line) for line in lines if line)
    return (f'<td><img src="{_data_uri(path, size, placeholder)}" width="{size}" height="{size}" '
            f'style="border:{BORDER}px solid {rgb}"><div class="cap">{caption}</div></td>')


def render_html(rows: list[QueryRow], title: str, notes: list[str], size: int = 128) -> str:
    """The report page: one table row per query, thumbnails embedded."""
    body = []
    for row in rows:
        cells = [_html_cell(row.path, BLUE, [f"query {row.image}", f"truth {row.truth}" if row.truth else ""],
                            size, "missing")]
        for tile in row.tiles:
            cells.append(_html_cell(tile.path, _frame_colour(tile.correct), _tile_lines(tile),
                                    size, tile.label if tile.path is None else "missing"))
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ["query"] + [f"rank {i + 1}" for i in range(5)])
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} td{{vertical-align:top;padding:4px}}
.cap{{font-size:12px;max-width:{size + 2 * BORDER}px;word-wrap:break-word}}</style></head>
<body><h1>{html.escape(title)}</h1><ul>{note_html}
<li>Frames: blue = query, green = the true id, red = a wrong id, grey = answer unknown.
The contact sheet: <a href="contact_sheet.png">contact_sheet.png</a></li></ul>
<table><tr>{head}</tr>{''.join(body)}</table></body></html>
"""


def write_report(rows: list[QueryRow], out_dir: str | Path, title: str, notes: list[str] = (),
                 size: int = 128) -> dict[str, str]:
    """Write `contact_sheet.png` and `report.html` into `out_dir` (atomically); returns their paths."""
    out_dir = Path(out_dir)
    png, page = out_dir / "contact_sheet.png", out_dir / "report.html"
    sheet = contact_sheet(rows, size)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding of the contact sheet failed")
    write_bytes(png, buf.tobytes())
    write_text(page, render_html(rows, title, list(notes), size))
    return {"png": str(png), "html": str(page)}
