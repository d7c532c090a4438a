"""The visual report writes a readable PNG and a self-contained HTML page from tiny crops."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from whaleid.report import QueryRow, Tile, contact_sheet, write_report


def _crop(path: Path, colour: tuple[int, int, int]) -> str:
    img = np.zeros((40, 60, 3), dtype=np.uint8)
    img[:] = colour
    cv2.circle(img, (30, 20), 12, (255, 255, 255), -1)
    cv2.imwrite(str(path), img)
    return str(path)


def _rows(tmp: Path) -> list[QueryRow]:
    q = _crop(tmp / "q.jpg", (200, 80, 30))
    g = [_crop(tmp / f"g{i}.jpg", (30 * i, 120, 200 - 30 * i)) for i in range(4)]
    known = QueryRow("query_known.jpg", q, "whale_a", [
        Tile("whale_b", 0.81, g[0], False), Tile("whale_a", 0.79, g[1], True),
        Tile("new_individual", 0.5, None, False), Tile("whale_c", 0.4, g[2], False),
        Tile("whale_d", 0.3, str(tmp / "missing.jpg"), False)])
    unknown = QueryRow("query_unmarked.jpg", None, None, [
        Tile("new_individual", 0.6, None), Tile("whale_a", 0.55, g[3]), Tile("whale_b", 0.5, g[0]),
        Tile("whale_c", 0.45, g[1]), Tile("whale_d", 0.2, g[2])])
    return [known, unknown]


def test_contact_sheet_marks_right_and_wrong(tmp_path: Path) -> None:
    sheet = contact_sheet(_rows(tmp_path), size=64)
    assert sheet.ndim == 3 and sheet.dtype == np.uint8
    # The second candidate of the first query is correct: its frame is green.
    x = 6 + 2 * (64 + 10 + 6) + 1
    y = 26 + 6 + 1
    assert tuple(sheet[y, x]) == (40, 170, 60)
    assert tuple(sheet[y, 6 + 1 * (64 + 10 + 6) + 1]) == (215, 50, 40)


def test_write_report_png_and_html(tmp_path: Path) -> None:
    paths = write_report(_rows(tmp_path), tmp_path / "out", "test report", ["a note"])
    png = cv2.imread(paths["png"])
    assert png is not None and png.shape[0] > 100 and png.shape[1] > 500
    page = Path(paths["html"]).read_text()
    assert page.count("data:image/jpeg;base64,") == 12  # 2 queries + 10 candidates, embedded
    assert "new_individual" in page and "a note" in page and "rgb(40,170,60)" in page
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_reranked_tiles_show_their_inlier_count(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    plain = write_report(rows, tmp_path / "plain", "plain")
    assert "inliers" not in Path(plain["html"]).read_text()
    rows[0].tiles[1].inliers = 23
    rows[0].tiles[0].inliers = 0
    page = Path(write_report(rows, tmp_path / "reranked", "reranked")["html"]).read_text()
    assert "23 inliers" in page and "0 inliers" in page and page.count(" inliers") == 2
    # The third caption line of rank 2 (write_report's 128 px tiles) has ink only when re-ranked.
    x0, y0, cell = 6 + 2 * (138 + 6), 26 + 6, 138
    band = (slice(y0 + cell + 13 + 30 - 10, y0 + cell + 13 + 30 + 3), slice(x0, x0 + cell))
    reranked_sheet = cv2.imread(str(tmp_path / "reranked" / "contact_sheet.png"), cv2.IMREAD_GRAYSCALE)
    plain_sheet = cv2.imread(plain["png"], cv2.IMREAD_GRAYSCALE)
    assert (reranked_sheet[band] < 100).sum() > 20 and (plain_sheet[band] < 100).sum() == 0
