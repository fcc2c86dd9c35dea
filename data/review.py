"""Turn ``bgsplit mine`` candidates into what a person labels them with: a contact-sheet PNG per class (to skim)
and one self-contained ``review.html`` (to mark each candidate yes / no and export the marks as CSV).

The page is a single file with everything inlined (thumbnails as ``data:`` URIs, CSS, JS) because it is opened
from a laptop's file:// or an object-store download, where nothing else can be fetched. Marks live in the
browser's localStorage, keyed by the page title and a hash of the candidate list, so a reload (or a crash of the
browser) loses no work, and a re-mined list with other candidates starts clean instead of inheriting stale marks.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
import re
from typing import TypedDict

from PIL import Image, ImageDraw, ImageFont, ImageOps

from data import storage

log = logging.getLogger("bgsplit.review")

__all__ = ["CSV_COLUMNS", "PAGE_THUMB", "PLACEHOLDER_RGB", "REVIEW_HTML", "SHEET_CAPTION_H", "SHEET_CELL",
           "SHEET_COLUMNS", "SHEET_PAD", "SHEET_TITLE_H", "ReviewFiles", "contact_sheet", "percentile_text",
           "review_html", "safe_name", "score_text", "write_review"]

REVIEW_HTML = "review.html"
CSV_COLUMNS = ("key", "class", "class_name", "label", "score", "rank", "shard", "index")

# Contact-sheet geometry. Cell i sits at column i % SHEET_COLUMNS, row i // SHEET_COLUMNS; its top-left corner is
# (SHEET_PAD + col * (SHEET_CELL + SHEET_PAD), SHEET_TITLE_H + row * (SHEET_CELL + SHEET_CAPTION_H + SHEET_PAD)).
# The width is fixed so that sheets of different classes line up when viewed side by side.
SHEET_COLUMNS = 10
SHEET_CELL = 96
SHEET_PAD = 4
SHEET_CAPTION_H = 14
SHEET_TITLE_H = 24
SHEET_BG_RGB = (255, 255, 255)
LETTERBOX_RGB = (32, 32, 32)
PLACEHOLDER_RGB = (160, 160, 160)
"""Fills the cell of a candidate whose thumbnail is missing or cannot be decoded."""

PAGE_THUMB = 128
"""Longest side of a thumbnail inlined in the page: a few kB each keeps a page of thousands of cards openable."""
PAGE_JPEG_QUALITY = 80


class ReviewFiles(TypedDict):
    review: str
    contact_sheets: dict[str, str]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _decode(key: str, data: bytes | None) -> Image.Image | None:
    """At most PAGE_THUMB px, 8-bit L or RGB; None (a placeholder is shown) when missing or undecodable, because one
    broken thumbnail must not cost the person the review of all the others."""
    if data is None:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        img.draft(img.mode, (PAGE_THUMB, PAGE_THUMB))  # JPEG: decode at a reduced scale, a big photo costs little
        img = img.convert("L" if img.mode in ("1", "L", "LA") else "RGB")
        img.thumbnail((PAGE_THUMB, PAGE_THUMB))
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL's PNG plugin: SyntaxError
        log.warning("thumbnail of %s cannot be decoded (%s): showing a placeholder", key, exc)
        return None


def _group(candidates: list[dict], class_names: list[str]) -> dict[int, list[dict]]:
    """Candidates per rare class 1..K, in the given (rank) order; every class is present, an empty one too, so a
    class that mined nothing is visible as such rather than silently absent."""
    groups: dict[int, list[dict]] = {c: [] for c in range(1, len(class_names))}
    seen: set[tuple[int, int]] = set()
    for cand in candidates:
        cls, rank = int(cand["class"]), int(cand["rank"])
        if cls not in groups:
            raise ValueError(f"candidate {cand['key']!r} has class {cls}, expected 1..{len(class_names) - 1}")
        if (cls, rank) in seen:  # (class, rank) names the card: two would share an id and one mark
            raise ValueError(f"two candidates of class {cls} have rank {rank}")
        seen.add((cls, rank))
        groups[cls].append(cand)
    return groups


def score_text(score: float) -> str:
    """Three significant digits at any scale: a rare class's softmax over an unlabelled pool sits at 1e-4..1e-6,
    where three decimals showed every candidate as 0.000."""
    return f"{score:#.3g}"


def percentile_text(rank: int, scored: int) -> str:
    """'top 0.041%': where a rank stands in the pool, which a bare score does not say (a low score can still be the
    pool's best)."""
    p = 100.0 * rank / max(scored, 1)
    return f"top {p:.0f}%" if p >= 10 else f"top {p:.1f}%" if p >= 1 else f"top {p:.2g}%"


def _cards(per_class: dict[int, list[dict]]) -> dict[int, list[list[dict]]]:
    """Candidates as cards: one per image, under the class where it ranks best (the smaller class id on a tie),
    holding its candidacy for every class, that one first. A key in three classes' top lists is looked at once and
    marked per class on one card, not found three times."""
    by_key: dict[str, list[dict]] = {}
    for recs in per_class.values():
        for rec in recs:
            by_key.setdefault(rec["key"], []).append(rec)
    cards: dict[int, list[list[dict]]] = {cls: [] for cls in per_class}
    for recs in per_class.values():
        for rec in recs:
            mine = by_key[rec["key"]]
            home = min(mine, key=lambda r: (r["rank"], r["class"]))
            if rec is home:
                cards[rec["class"]].append([home, *sorted((r for r in mine if r is not home), key=lambda r: r["class"])])
    return cards


def contact_sheet(class_name: str, items: list[dict], images: dict[str, Image.Image | None]) -> Image.Image:
    """One RGB image: a title line, then a SHEET_COLUMNS-wide grid of letterboxed cells captioned '#rank: score'."""
    rows = math.ceil(len(items) / SHEET_COLUMNS)
    width = SHEET_PAD + SHEET_COLUMNS * (SHEET_CELL + SHEET_PAD)
    sheet = Image.new("RGB", (width, SHEET_TITLE_H + rows * (SHEET_CELL + SHEET_CAPTION_H + SHEET_PAD)), SHEET_BG_RGB)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((SHEET_PAD, SHEET_TITLE_H // 2), f"{class_name}: {len(items)} candidates", fill=(0, 0, 0), font=font,
              anchor="lm")
    for i, cand in enumerate(items):
        x = SHEET_PAD + (i % SHEET_COLUMNS) * (SHEET_CELL + SHEET_PAD)
        y = SHEET_TITLE_H + (i // SHEET_COLUMNS) * (SHEET_CELL + SHEET_CAPTION_H + SHEET_PAD)
        img = images.get(cand["key"])
        if img is None:
            draw.rectangle((x, y, x + SHEET_CELL - 1, y + SHEET_CELL - 1), fill=PLACEHOLDER_RGB)
        else:
            fitted = ImageOps.contain(img, (SHEET_CELL, SHEET_CELL))
            draw.rectangle((x, y, x + SHEET_CELL - 1, y + SHEET_CELL - 1), fill=LETTERBOX_RGB)
            sheet.paste(fitted.convert("RGB"), (x + (SHEET_CELL - fitted.width) // 2,
                                                y + (SHEET_CELL - fitted.height) // 2))
        draw.text((x + SHEET_CELL // 2, y + SHEET_CELL + SHEET_CAPTION_H // 2),
                  f"#{cand['rank']}: {score_text(float(cand['score']))}", fill=(0, 0, 0), font=font, anchor="mm")
    return sheet


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=PAGE_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _record(cand: dict) -> dict:
    """What the page needs of a candidate, in plain JSON types (mine may hand over numpy scalars); ``id`` names its
    mark (one per class an image is a candidate for), ``card`` is set when the cards are laid out."""
    return {"id": f"mark-{int(cand['class'])}-{int(cand['rank'])}", "key": str(cand["key"]),
            "class": int(cand["class"]), "class_name": str(cand["class_name"]), "score": float(cand["score"]),
            "rank": int(cand["rank"]), "shard": str(cand["shard"]), "index": int(cand["index"])}


def _script_json(value: object) -> str:
    """JSON that is safe inside <script>: no '<' at all, so neither '</script>' nor '<!--' can end or bend it."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def _card(recs: list[dict], uri: str | None, scored: int | None) -> str:
    esc = html.escape
    home = recs[0]
    image = (f'<img src="{uri}" alt="{esc(home["key"])}">' if uri is not None
             else '<div class="missing">no image</div>')
    marks = []
    for n, rec in enumerate(recs, start=1):
        where = f" title=\"{percentile_text(rec['rank'], scored)} of {scored:,} scored\"" if scored else ""
        marks.append(f'<div class="mark" id="{rec["id"]}" data-class="{rec["class"]}" data-label="">'
                     f'<span class="cname">{n if len(recs) > 1 else ""}{" " if len(recs) > 1 else ""}'
                     f'{esc(rec["class_name"])}</span><b>#{rec["rank"]}</b>'
                     f'<span class="score"{where}>{score_text(rec["score"])}</span>'
                     '<span class="set"><button type="button" data-set="yes">yes</button>'
                     '<button type="button" data-set="no">no</button></span></div>')
    return (f'<div class="card{" multi" if len(recs) > 1 else ""}" id="card-{home["class"]}-{home["rank"]}" '
            f'data-key="{esc(home["key"])}" data-class="{home["class"]}" data-rank="{home["rank"]}" data-label="">'
            f'<div class="thumb">{image}<span class="badge"></span></div>'
            f'<div class="key" title="{esc(home["key"])}">{esc(home["key"])}</div>'
            f'<div class="marks">{"".join(marks)}</div></div>')


def review_html(candidates: list[dict], images: dict[str, Image.Image | None], class_names: list[str],
                title: str, scored: int | None = None) -> str:
    """The whole page as one string; ``images`` maps key -> decoded thumbnail (None for a placeholder); ``scored``
    (the pool images scored) adds each candidate's rank percentile to its score's tooltip."""
    groups = _group(candidates, class_names)
    per_class = {cls: [_record(c) for c in items] for cls, items in groups.items()}
    cards = _cards(per_class)
    for recs in cards.values():
        for card in recs:
            for rec in card:
                rec["card"] = f"card-{card[0]['class']}-{card[0]['rank']}"
    records = [rec for recs in cards.values() for card in recs for rec in card]  # in page order
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]
    uris = {key: _data_uri(img) for key, img in images.items() if img is not None}  # once per key, not per card
    sections = []
    for cls, recs in cards.items():
        here = "".join(_card(card, uris.get(card[0]["key"]), scored) for card in recs)
        elsewhere = len(per_class[cls]) - len(recs)
        note = (f", {elsewhere} of them on {'its' if elsewhere == 1 else 'their'} image's card under a class "
                f"{'it ranks' if elsewhere == 1 else 'they rank'} higher in" if elsewhere else "")
        sections.append(f'<section id="class-{cls}" data-class="{cls}"><h2>{html.escape(class_names[cls])} '
                        f'<small>{len(per_class[cls])} candidates{note}</small></h2><div class="grid">{here}</div>'
                        '</section>')
    images_count = sum(len(recs) for recs in cards.values())
    esc = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_STYLE}</style></head>
<body><header><h1>{esc(title)}</h1>
<span class="counts"><span>{images_count} images, {len(records)} candidates:</span>
<span class="c-yes">yes <b id="count-yes">0</b></span>
<span class="c-no">no <b id="count-no">0</b></span> <span>unset <b id="count-unset">0</b></span></span>
<button type="button" id="export">Export CSV</button> <button type="button" id="copy">Copy CSV</button>
<span id="status"></span>
<p class="help">one card per image, a mark per class it is a candidate for (yes for one class makes another's yes a
no) &middot; click a card: unset &rarr; yes &rarr; no of its first class, or a class's yes / no &middot;
<kbd>&larr;&rarr;&uarr;&darr;</kbd> / <kbd>h</kbd> <kbd>j</kbd> <kbd>k</kbd> <kbd>l</kbd> move &middot;
<kbd>1</kbd>&ndash;<kbd>9</kbd> pick a card's class &middot; <kbd>y</kbd> yes &middot; <kbd>n</kbd> no to every class
of the card &middot; <kbd>u</kbd> / <kbd>Backspace</kbd> clear &middot; <kbd>a</kbd> all unset of this class &rarr; no
&middot; scores to 3 significant digits &middot; marks are kept in this browser until exported</p></header>
<main id="review" data-storage-key="{esc(f"bgsplit-review:{title}:{digest}")}">{"".join(sections)}</main>
<script type="application/json" id="candidates">{_script_json(records)}</script>
<script>{_SCRIPT.replace("__CSV_COLUMNS__", json.dumps(CSV_COLUMNS))}</script></body></html>
"""


def write_review(out: str, candidates: list[dict], thumbs: dict[str, bytes], class_names: list[str],
                 title: str = "bgsplit mine: review", scored: int | None = None) -> ReviewFiles:
    """Write ``contact-<class>.png`` per rare class and ``review.html`` into ``out`` (local folder or URL)."""
    images = {key: _decode(key, thumbs.get(key)) for key in dict.fromkeys(str(c["key"]) for c in candidates)}
    groups = _group(candidates, class_names)
    sheets: dict[str, str] = {}
    used: set[str] = set()
    for cls, items in groups.items():
        name = safe_name(class_names[cls])
        if name in used:  # "a b" and "a_b" would overwrite each other's sheet
            name = f"{name}-{cls}"
        used.add(name)
        url = storage.join(out, f"contact-{name}.png")
        storage.write_bytes(url, _png(contact_sheet(class_names[cls], items, images)))
        sheets[class_names[cls]] = url
    review = storage.join(out, REVIEW_HTML)
    storage.write_bytes(review, review_html(candidates, images, class_names, title, scored).encode("utf-8"))
    return {"review": review, "contact_sheets": sheets}


_STYLE = """
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
  background: #f3f4f7; }
header { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; align-items: center; gap: 6px 14px;
  padding: 8px 16px; background: #fff; border-bottom: 1px solid #d5d8e0; box-shadow: 0 1px 4px rgba(0,0,0,.06); }
h1 { margin: 0; font-size: 16px; }
.counts { display: flex; gap: 12px; }
.c-yes b { color: #1f8a34; } .c-no b { color: #c62828; }
button { font: inherit; padding: 3px 10px; border: 1px solid #b9bfcc; border-radius: 4px; background: #fff;
  cursor: pointer; }
button:hover { background: #eef1f6; }
#export { background: #1e6fd9; border-color: #1e6fd9; color: #fff; }
#status { color: #5b6374; }
.help { flex-basis: 100%; margin: 0; color: #5b6374; font-size: 12px; }
kbd { padding: 0 4px; border: 1px solid #c8ccd6; border-radius: 3px; background: #f7f8fa; font-size: 11px; }
main { padding: 4px 16px 40px; }
h2 { margin: 16px 0 8px; font-size: 15px; } h2 small { color: #5b6374; font-weight: normal; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(144px, 1fr)); gap: 8px; }
.card { position: relative; padding: 5px; border: 3px solid transparent; border-radius: 6px; background: #fff;
  box-shadow: 0 0 0 1px #d5d8e0; cursor: pointer; user-select: none; }
.card.cursor { outline: 3px solid #1e6fd9; outline-offset: 2px; }
.card[data-label="yes"] { border-color: #2e9d45; }
.card[data-label="no"] { border-color: #d33b3b; }
.card[data-label="no"] .thumb > :not(.badge) { opacity: .45; }
.thumb { position: relative; height: 128px; display: flex; align-items: center; justify-content: center;
  background: #202020; border-radius: 3px; overflow: hidden; }
.thumb img { width: 100%; height: 100%; object-fit: contain; }
.missing { width: 100%; height: 100%; display: flex; align-items: center; justify-content: center;
  background: #a0a0a0; color: #333; }
.badge { position: absolute; top: 4px; right: 4px; padding: 1px 6px; border-radius: 3px; color: #fff;
  font-weight: 700; font-size: 12px; }
.badge:empty { display: none; }
.card[data-label="yes"] .badge { background: #2e9d45; }
.card[data-label="no"] .badge { background: #d33b3b; }
.card.multi { box-shadow: 0 0 0 2px #8a6fd1; }
.score { font-variant-numeric: tabular-nums; }
.key { margin-top: 4px; overflow: hidden; white-space: nowrap; text-overflow: ellipsis; color: #5b6374;
  font: 11px ui-monospace, SFMono-Regular, Menlo, monospace; }
.mark { display: grid; grid-template-columns: 1fr auto auto; gap: 2px 6px; align-items: center; margin-top: 3px;
  padding: 1px 3px; border-left: 3px solid transparent; border-radius: 3px; }
.mark .cname { overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }
.mark.sel { background: #e6eefb; }
.mark[data-label="yes"] { border-left-color: #2e9d45; background: #e3f4e6; }
.mark[data-label="no"] { border-left-color: #d33b3b; background: #fbe6e6; }
.set { grid-column: 1 / -1; display: flex; gap: 4px; }
.set button { flex: 1; padding: 1px 0; font-size: 12px; }
.set button[data-set="yes"]:hover { background: #dff3e3; } .set button[data-set="no"]:hover { background: #fbe1e1; }
"""

# Marks are kept per candidate id (mark-<class>-<rank>): the storage key already pins the exact candidate list. A
# card (one image) holds one mark per class it is a candidate for; the cursor is a card and one of its marks.
_SCRIPT = r"""
(() => {
  "use strict";
  const COLUMNS = __CSV_COLUMNS__;
  const cands = JSON.parse(document.getElementById("candidates").textContent);
  const cardIds = [...new Set(cands.map((c) => c.card))];
  const cards = cardIds.map((id) => document.getElementById(id));
  const index = new Map(cards.map((el, i) => [el, i]));
  const marksOf = cardIds.map((id) => cands.filter((c) => c.card === id));  // the card's marks, in row order
  const byId = new Map(cands.map((c) => [c.id, c]));
  const cardOf = new Map(cardIds.map((id, i) => [id, i]));
  const storageKey = document.getElementById("review").dataset.storageKey;
  const status = document.getElementById("status");
  const labels = load();
  let cursor = 0, row = 0;

  function load() {
    try {
      const saved = JSON.parse(localStorage.getItem(storageKey) || "{}");
      return Object.fromEntries(cands.filter((c) => saved[c.id] === "yes" || saved[c.id] === "no")
        .map((c) => [c.id, saved[c.id]]));
    } catch (e) {
      return {};  // storage blocked or corrupt: start clean rather than not at all
    }
  }

  function save() {
    try {
      localStorage.setItem(storageKey, JSON.stringify(labels));
    } catch (e) {
      status.textContent = "marks cannot be saved in this browser: export before closing";
    }
  }

  // a card is yes when one class is, no when every class is, else unset
  function paint(i) {
    const marks = marksOf[i];
    for (const c of marks) document.getElementById(c.id).dataset.label = labels[c.id] || "";
    const yes = marks.find((c) => labels[c.id] === "yes");
    const label = yes ? "yes" : marks.every((c) => labels[c.id] === "no") ? "no" : "";
    cards[i].dataset.label = label;
    cards[i].querySelector(".badge").textContent =
      yes && marks.length > 1 ? yes.class_name : label.toUpperCase();
  }

  function counts() {
    let yes = 0, no = 0;
    for (const c of cands) {
      if (labels[c.id] === "yes") yes++;
      else if (labels[c.id] === "no") no++;
    }
    document.getElementById("count-yes").textContent = yes;
    document.getElementById("count-no").textContent = no;
    document.getElementById("count-unset").textContent = cands.length - yes - no;
  }

  // an image has one class: its yes for one class turns a yes for another into a no (add-labels refuses two)
  function mark(ids, label) {
    const touched = new Set();
    for (const id of ids) {
      const i = cardOf.get(byId.get(id).card);
      if (label === "yes") {
        for (const other of marksOf[i]) if (other.id !== id && labels[other.id] === "yes") labels[other.id] = "no";
      }
      if (label) labels[id] = label;
      else delete labels[id];
      touched.add(i);
    }
    touched.forEach(paint);
    save();
    counts();
  }

  function select(r) {
    for (const c of marksOf[cursor]) document.getElementById(c.id).classList.remove("sel");
    row = Math.max(0, Math.min(marksOf[cursor].length - 1, r));
    if (marksOf[cursor].length > 1) document.getElementById(marksOf[cursor][row].id).classList.add("sel");
  }

  function moveTo(i, r = 0) {
    if (!cards.length) return;
    for (const c of marksOf[cursor]) document.getElementById(c.id).classList.remove("sel");
    cards[cursor].classList.remove("cursor");
    cursor = Math.max(0, Math.min(cards.length - 1, i));
    cards[cursor].classList.add("cursor");
    cards[cursor].scrollIntoView({block: "nearest"});
    select(r);
  }

  // The grid reflows with the window, so "one row up/down" is found on screen: the nearest card by x in the
  // first row above/below; DOM order runs on into the next section, so that is where the last row leads.
  function rowStep(dir) {
    const here = cards[cursor].getBoundingClientRect();
    const top = (i) => cards[i].getBoundingClientRect().top;
    let i = cursor + dir;
    while (i >= 0 && i < cards.length && Math.abs(top(i) - here.top) < 1) i += dir;
    if (i < 0 || i >= cards.length) return cursor;
    const rowTop = top(i);
    let best = i, bestDist = Infinity;
    for (; i >= 0 && i < cards.length && Math.abs(top(i) - rowTop) < 1; i += dir) {
      const dist = Math.abs(cards[i].getBoundingClientRect().left - here.left);
      if (dist < bestDist) { best = i; bestDist = dist; }
    }
    return best;
  }

  function csvField(value) {
    const s = String(value);
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  window.bgsplitLabelsCSV = () => {
    const lines = [COLUMNS.join(",")];
    for (const c of cands) {
      const label = labels[c.id];
      if (label) lines.push(COLUMNS.map((col) => csvField(col === "label" ? label : c[col])).join(","));
    }
    return lines.join("\r\n") + "\r\n";
  };

  document.getElementById("export").addEventListener("click", () => {
    const url = URL.createObjectURL(new Blob([window.bgsplitLabelsCSV()], {type: "text/csv;charset=utf-8"}));
    const a = document.createElement("a");
    a.href = url;
    a.download = "labels.csv";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);  // the download reads the blob after click() returns
  });

  document.getElementById("copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(window.bgsplitLabelsCSV());
      status.textContent = "CSV copied";
    } catch (e) {
      status.textContent = "clipboard not available here: use Export CSV";
    }
  });

  const next = {"": "yes", "yes": "no", "no": ""};

  document.getElementById("review").addEventListener("click", (e) => {
    const card = e.target.closest(".card");
    if (!card) return;
    const i = index.get(card);
    const markEl = e.target.closest(".mark");
    const r = markEl ? marksOf[i].findIndex((c) => c.id === markEl.id) : 0;
    const id = marksOf[i][r].id;
    const button = e.target.closest("button[data-set]");
    mark([id], button ? button.dataset.set : next[labels[id] || ""]);
    moveTo(i, r);
  });

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || !cards.length) return;  // leave browser shortcuts alone
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    const here = marksOf[cursor];
    if (key === "ArrowLeft" || key === "h") moveTo(cursor - 1);
    else if (key === "ArrowRight" || key === "l") moveTo(cursor + 1);
    else if (key === "ArrowUp" || key === "k") moveTo(rowStep(-1));
    else if (key === "ArrowDown" || key === "j") moveTo(rowStep(1));
    else if (/^[1-9]$/.test(key) && Number(key) <= here.length) select(Number(key) - 1);
    else if (key === "y") { mark([here[row].id], "yes"); moveTo(cursor + 1); }
    else if (key === "n") { mark(here.map((c) => c.id), "no"); moveTo(cursor + 1); }
    else if (key === "u" || key === "Backspace") mark(here.map((c) => c.id), "");
    else if (key === "a") {
      const cls = here[row].class;
      mark(cands.filter((c) => c.class === cls && !labels[c.id]).map((c) => c.id), "no");
    }
    else return;
    e.preventDefault();  // arrows would scroll the page, Backspace would go back in some browsers
  });

  cards.forEach((_, i) => paint(i));
  counts();
  moveTo(0);
})();
"""
