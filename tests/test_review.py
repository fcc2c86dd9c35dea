"""The review outputs of ``bgsplit mine``: contact sheets checked pixel by pixel, and review.html driven in a real
headless Chromium (keyboard, mouse, CSV download, localStorage across a reload), because the page's whole worth is
in its JavaScript, which no Python-side check of the HTML text would exercise."""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from data import review

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HEADER = ["key", "class", "class_name", "label", "score", "rank", "shard", "index"]
CLASS_NAMES = ["background", "Trouser", "Bag"]
SHARD = "s3://pool/mine/shard-{:06d}.tar"


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _colour(i: int) -> tuple[int, int, int]:
    """Distinct solid colours, far enough apart that a cell showing the wrong thumbnail cannot pass."""
    return (40 + (i * 67) % 200, 30 + (i * 131) % 200, 20 + (i * 29) % 220)


def _pool() -> tuple[list[dict], dict[str, bytes], dict[str, tuple[int, int, int] | None]]:
    """12 Trouser candidates (two sheet rows) and 3 Bag ones; one key under both classes, one greyscale thumbnail,
    one wide one, one JPEG, one missing. Returns candidates, thumbs and the colour each card must show."""
    candidates, thumbs, colours = [], {}, {}
    for i in range(12):
        key = f"pool_{i:04d}"
        candidates.append({"key": key, "class": 1, "class_name": "Trouser", "score": round(0.99 - i * 0.037, 6),
                           "rank": i + 1, "shard": SHARD.format(i // 5), "index": i})
        if i == 3:  # greyscale
            thumbs[key], colours[key] = _encode(Image.new("L", (50, 50), 90)), (90, 90, 90)
        elif i == 5:
            colours[key] = None  # no thumbnail: the placeholder
        else:
            size = (64, 32) if i == 1 else (40, 40)
            thumbs[key], colours[key] = _encode(Image.new("RGB", size, _colour(i))), _colour(i)
    # pool_0007 is a Trouser too (rank 8 there, 1 here: one card, under Bag); bag-b_2 scores like a rare class on a
    # real pool, where three decimals read 0.000
    bag = [("pool_0007", 0.8123456789), ("bag-a_1", 0.5), ("bag-b_2", 1.2345e-05)]
    for rank, (key, score) in enumerate(bag, 1):
        candidates.append({"key": key, "class": 2, "class_name": "Bag", "score": score, "rank": rank,
                           "shard": SHARD.format(7), "index": 100 + rank})
    thumbs["bag-a_1"], colours["bag-a_1"] = _encode(Image.new("RGB", (70, 70), (10, 200, 60)), "JPEG"), (10, 200, 60)
    thumbs["bag-b_2"], colours["bag-b_2"] = _encode(Image.new("RGB", (30, 30), (230, 230, 20))), (230, 230, 20)
    return candidates, thumbs, colours


# -- contact sheets --------------------------------------------------------------------------------------------------
def test_contact_sheets_grid_and_cells(tmp_path):
    candidates, thumbs, colours = _pool()
    files = review.write_review(str(tmp_path), candidates, thumbs, CLASS_NAMES)

    assert files["review"] == str(tmp_path / "review.html")
    assert files["contact_sheets"] == {"Trouser": str(tmp_path / "contact-Trouser.png"),
                                       "Bag": str(tmp_path / "contact-Bag.png")}
    step_x, step_y = review.SHEET_CELL + review.SHEET_PAD, review.SHEET_CELL + review.SHEET_CAPTION_H + review.SHEET_PAD
    for cls, name in ((1, "Trouser"), (2, "Bag")):
        items = [c for c in candidates if c["class"] == cls]
        with Image.open(files["contact_sheets"][name]) as sheet:
            assert sheet.format == "PNG" and sheet.mode == "RGB"
            rows = math.ceil(len(items) / review.SHEET_COLUMNS)
            assert sheet.size == (review.SHEET_PAD + review.SHEET_COLUMNS * step_x,
                                  review.SHEET_TITLE_H + rows * step_y)
            for i, cand in enumerate(items):  # the centre of every cell, second row included
                x = review.SHEET_PAD + (i % review.SHEET_COLUMNS) * step_x + review.SHEET_CELL // 2
                y = review.SHEET_TITLE_H + (i // review.SHEET_COLUMNS) * step_y + review.SHEET_CELL // 2
                want = colours[cand["key"]] or review.PLACEHOLDER_RGB
                got = sheet.getpixel((x, y))
                assert max(abs(a - b) for a, b in zip(got, want)) <= 6, (name, i, cand["key"], got, want)
            # the caption band under the first cell has dark text pixels drawn on it
            band = sheet.crop((review.SHEET_PAD, review.SHEET_TITLE_H + review.SHEET_CELL,
                               review.SHEET_PAD + review.SHEET_CELL,
                               review.SHEET_TITLE_H + review.SHEET_CELL + review.SHEET_CAPTION_H))
            assert band.convert("L").getextrema()[0] < 100


def test_sheet_names_are_made_safe_and_distinct(tmp_path):
    candidates = [{"key": "k1", "class": 1, "class_name": "a b", "score": 0.5, "rank": 1, "shard": "x", "index": 0},
                  {"key": "k2", "class": 2, "class_name": "a/b", "score": 0.5, "rank": 1, "shard": "x", "index": 1}]
    files = review.write_review(str(tmp_path), candidates, {}, ["bg", "a b", "a/b"])
    assert files["contact_sheets"] == {"a b": str(tmp_path / "contact-a_b.png"),
                                       "a/b": str(tmp_path / "contact-a_b-2.png")}
    assert all(Path(p).is_file() for p in files["contact_sheets"].values())


# -- the page in a browser -------------------------------------------------------------------------------------------
@pytest.fixture
def browser(tmp_path):
    """Starts (when called, so that a missing binary FAILS the test rather than erroring its setup) a headless
    Chromium from Debian's packages with downloads going to tmp_path/dl; quits it at teardown. Missing binaries
    fail, not skip: a skip would let the page's JavaScript go untested without anyone noticing."""
    drivers = []

    def start():
        missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
        if missing:
            pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver", pytrace=False)
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        dl = tmp_path / "dl"
        dl.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1000"):
            options.add_argument(arg)
        options.add_experimental_option("prefs", {"download.default_directory": str(dl),
                                                  "download.prompt_for_download": False})
        drivers.append(webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options))
        return drivers[-1], dl

    yield start
    for driver in drivers:
        driver.quit()


def _keys(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def _labels(driver) -> dict[str, str]:
    """Every candidate's mark (one per class an image is a candidate for) by its id."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.mark')].map(c => [c.id, c.dataset.label]))")


def _cursor(driver) -> str:
    return driver.execute_script("return [...document.querySelectorAll('.card.cursor')].map(c => c.id).join(' ')")


def _counts(driver) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    return {k: int(driver.find_element(By.ID, f"count-{k}").text) for k in ("yes", "no", "unset")}


def _wait_for_file(path: Path, timeout_s: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and not list(path.parent.glob("*.crdownload")):
            return path.read_bytes()
        time.sleep(0.1)
    raise AssertionError(f"{path.name} not downloaded within {timeout_s:g}s; folder has {os.listdir(path.parent)}")


def _card_id(cand: dict) -> str:
    return f"card-{cand['class']}-{cand['rank']}"


def _mark_id(cand: dict) -> str:
    return f"mark-{cand['class']}-{cand['rank']}"


def test_review_page_keyboard_mouse_export_and_reload(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from data.add_labels import parse_labels

    driver, dl = browser()
    candidates, thumbs, _ = _pool()
    files = review.write_review(str(tmp_path / "out"), candidates, thumbs, CLASS_NAMES)
    driver.get(Path(files["review"]).as_uri())

    # one card per image, under the class it ranks best in; pool_0007 (Trouser #8, Bag #1) is one card under Bag
    homes = {1: [c for c in candidates if c["class"] == 1 and c["key"] != "pool_0007"],
             2: [c for c in candidates if c["class"] == 2]}
    for cls in (1, 2):
        cards = driver.find_elements(By.CSS_SELECTOR, f"section[data-class='{cls}'] .card")
        assert [(c.get_attribute("id"), c.get_attribute("data-key"), c.get_attribute("data-class")) for c in cards] \
            == [(_card_id(c), c["key"], str(cls)) for c in homes[cls]]
    assert len(driver.find_elements(By.CSS_SELECTOR, ".card")) == len({c["key"] for c in candidates}) == 14
    assert [m.get_attribute("id") for m in driver.find_elements(By.CSS_SELECTOR, "#card-2-1 .mark")] == \
        ["mark-2-1", "mark-1-8"]
    assert len(driver.find_elements(By.CSS_SELECTOR, ".card img")) == 14 - 1  # one placeholder
    by_id = {_mark_id(c): c for c in candidates}
    expected = {mark: "" for mark in by_id}
    assert _labels(driver) == expected and _cursor(driver) == "card-1-1"

    _keys(driver, "y")
    _keys(driver, "n")
    expected.update({"mark-1-1": "yes", "mark-1-2": "no"})
    assert _cursor(driver) == "card-1-3"
    _keys(driver, Keys.ARROW_RIGHT, "y")
    expected["mark-1-4"] = "yes"
    assert _labels(driver) == expected and _cursor(driver) == "card-1-5"
    _keys(driver, "h", "u")  # back onto card-1-4 and clear it, then mark it again
    expected["mark-1-4"] = ""
    assert _labels(driver) == expected and _cursor(driver) == "card-1-4"
    _keys(driver, Keys.BACKSPACE, "l", "h", "y")
    expected["mark-1-4"] = "yes"
    assert _labels(driver) == expected and _cursor(driver) == "card-1-5"

    # up/down go by a row of the grid as laid out (the window width decides it): to the nearest card by x in the
    # next row down, then in the next row up
    rects = driver.execute_script("return Object.fromEntries([...document.querySelectorAll('.card')]"
                                  ".map(c => { const r = c.getBoundingClientRect(); return [c.id, [r.x, r.y]]; }))")

    def next_row(card: str, down: bool) -> str:
        x0, y0 = rects[card]
        ys = [y for _, y in rects.values() if (y > y0 + 1 if down else y < y0 - 1)]
        row_y = min(ys) if down else max(ys)
        return min((c for c, (_, y) in rects.items() if abs(y - row_y) < 1), key=lambda c: abs(rects[c][0] - x0))

    below = next_row("card-1-5", down=True)
    assert below not in ("card-1-5", "card-1-6")
    _keys(driver, Keys.ARROW_DOWN)
    assert _cursor(driver) == below
    _keys(driver, "k")
    assert _cursor(driver) == next_row(below, down=False)
    _keys(driver, "j", Keys.ARROW_UP)
    assert _cursor(driver) == next_row(below, down=False)

    # the two-class card: a click on the image cycles its first class; each class has its own yes / no; a yes for
    # one class turns the other's yes into a no (add-labels refuses an image with two classes)
    second = driver.find_element(By.ID, "card-2-1")
    second.find_element(By.CSS_SELECTOR, ".thumb").click()
    assert driver.find_element(By.ID, "mark-2-1").get_attribute("data-label") == "yes"
    assert second.get_attribute("data-label") == "yes" and second.find_element(By.CSS_SELECTOR, ".badge").text == "Bag"
    driver.find_element(By.CSS_SELECTOR, "#mark-1-8 button[data-set='yes']").click()
    expected.update({"mark-2-1": "no", "mark-1-8": "yes"})
    assert _labels(driver) == expected
    assert second.find_element(By.CSS_SELECTOR, ".badge").text == "Trouser"
    driver.find_element(By.CSS_SELECTOR, "#card-2-2 button[data-set='yes']").click()
    expected["mark-2-2"] = "yes"
    # by keyboard: 2 picks the card's second class, y marks it; n says the image is none of its classes
    _keys(driver, Keys.ARROW_LEFT, "2", "y")
    expected.update({"mark-1-8": "yes"})
    assert _labels(driver) == expected and _cursor(driver) == "card-2-2"
    _keys(driver, Keys.ARROW_LEFT, "n")
    expected.update({"mark-2-1": "no", "mark-1-8": "no"})
    assert _labels(driver) == expected
    assert second.get_attribute("data-label") == "no" and second.find_element(By.CSS_SELECTOR, ".badge").text == "NO"
    _keys(driver, Keys.ARROW_LEFT, "2", "y")  # back onto card-2-1: a Trouser after all
    expected.update({"mark-1-8": "yes"})
    assert _labels(driver) == expected
    assert driver.find_element(By.CSS_SELECTOR, "#card-2-2 .badge").text == "YES"
    marked = {v: sum(1 for x in expected.values() if x == v) for v in ("yes", "no", "")}
    assert _counts(driver) == {"yes": marked["yes"], "no": marked["no"], "unset": marked[""]}

    # scores to three significant digits: 1.2345e-05 is not 0.000
    shown = {m.get_attribute("id"): m.find_element(By.CSS_SELECTOR, ".score").text
             for m in driver.find_elements(By.CSS_SELECTOR, ".mark")}
    assert shown["mark-2-3"] == "1.23e-05" and shown["mark-2-1"] == "0.812" and shown["mark-2-2"] == "0.500"

    driver.find_element(By.ID, "export").click()
    data = _wait_for_file(dl / "labels.csv")
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert rows[0] == HEADER
    want = [[c["key"], str(c["class"]), c["class_name"], expected[_mark_id(c)], c["score"], str(c["rank"]), c["shard"],
             str(c["index"])] for c in candidates if expected[_mark_id(c)]]
    got = sorted(row[:4] + [float(row[4])] + row[5:] for row in rows[1:])
    assert got == sorted(want)
    assert driver.execute_script("return window.bgsplitLabelsCSV()") == data.decode("utf-8")
    # add-labels reads the export as it is: one label per image, the two-class one a Trouser
    labels = {lb.key: lb.cls for lb in parse_labels(data.decode("utf-8"), CLASS_NAMES, "labels.csv")}
    assert labels["pool_0007"] == 1 and labels["bag-a_1"] == 2 and labels["pool_0001"] == 0
    assert len(labels) == len({c["key"] for c in candidates if expected[_mark_id(c)]})

    driver.refresh()
    assert _labels(driver) == expected and _counts(driver)["yes"] == marked["yes"]
    assert _cursor(driver) == "card-1-1"
    _keys(driver, "a")  # every still-unset Trouser mark is background; the Bags are left as they are
    expected.update({m: "no" for m, label in expected.items() if m.startswith("mark-1-") and not label})
    assert expected["mark-2-3"] == "" and _labels(driver) == expected
    assert _counts(driver) == {"yes": marked["yes"], "no": len(expected) - marked["yes"] - 1, "unset": 1}

    shot = tmp_path / "review.png"
    driver.save_screenshot(str(shot))
    if os.environ.get("BGSPLIT_SCREENSHOT_DIR"):
        shot = Path(shutil.copy(shot, Path(os.environ["BGSPLIT_SCREENSHOT_DIR"]) / "review.png"))
    print(f"review screenshot: {shot}")


def test_score_text_shows_small_scores():
    assert review.score_text(1.2345e-05) == "1.23e-05" and review.score_text(4.2e-4) == "0.000420"
    assert review.score_text(0.8123456) == "0.812" and review.score_text(1.0) == "1.00"
    assert review.percentile_text(1, 2432) == "top 0.041%" and review.percentile_text(100, 2432) == "top 4.1%"
    html = review.review_html([{"key": "k", "class": 1, "class_name": "a", "score": 3e-6, "rank": 2, "shard": "s",
                                "index": 0}], {}, ["bg", "a"], "t", scored=1000)
    assert '<span class="score" title="top 0.2% of 1,000 scored">3.00e-06</span>' in html


def test_names_needing_escapes_round_trip(tmp_path, browser):
    from selenium.webdriver.common.by import By

    driver, _ = browser()
    nasty = 'say "hi", </script><b>bold</b> & co'
    shard = 's3://pool/a,b "c"/shard-000001.tar'
    candidates = [{"key": "odd-key_01", "class": 1, "class_name": nasty, "score": 0.75, "rank": 1, "shard": shard,
                   "index": 3},
                  {"key": "odd-key_02", "class": 1, "class_name": nasty, "score": 0.5, "rank": 2, "shard": shard,
                   "index": 4}]
    thumbs = {"odd-key_01": _encode(Image.new("RGB", (20, 20), (1, 2, 3)))}
    files = review.write_review(str(tmp_path), candidates, thumbs, ["bg", nasty])
    assert Path(files["contact_sheets"][nasty]).name == "contact-say__hi_____script__b_bold__b____co.png"
    driver.get(Path(files["review"]).as_uri())

    assert driver.find_element(By.CSS_SELECTOR, "section[data-class='1'] h2").text.startswith(nasty)
    assert not driver.find_elements(By.CSS_SELECTOR, "h2 b")  # the name is text, not markup
    _keys(driver, "y")
    driver.find_element(By.CSS_SELECTOR, "#card-1-2 button[data-set='no']").click()
    assert _labels(driver) == {"mark-1-1": "yes", "mark-1-2": "no"}
    text = driver.execute_script("return window.bgsplitLabelsCSV()")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [(r["key"], r["class_name"], r["label"], r["shard"]) for r in rows] == \
        [("odd-key_01", nasty, "yes", shard), ("odd-key_02", nasty, "no", shard)]
