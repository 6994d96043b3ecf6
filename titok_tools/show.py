"""titok-show: see what the filter keeps, as one self-contained HTML page or in the terminal.

Every completion token is coloured by its excess on a diverging scale centred at 0 (blue below,
red above, the same scale for the whole page), selected tokens (titok.source.mask) are
underlined, and when titok.target is there its tokens stand beside the source's, coloured by the
score they were aligned to (grey: no score); hovering a token lights up the tokens on the other
side whose character spans overlap it (the aligner's own overlap rule, align.overlap_ranges).

The page is read in two passes (stdin is spooled): pass one keeps only numbers (every token's
excess, each record's mean excess and coverage) for the dataset plots and the colour scale; pass
two streams the records into the page. Sorting does not hold records either: the cards are
written in input order and placed by CSS `order`. Only --ansi with --sort buffers its output
(a terminal cannot reorder), and only the --limit records shown.
"""
import base64
import hashlib
import html
import logging
import math
from array import array

import click
import numpy as np

from . import cli
from .alignment import as_spans, offsets_problem, overlap_ranges
from .records import (RecordError, check_number, check_numbers, filter_settings, prompt_and_completion, read_records,
                      source_scores, spooled, text_output, titok_part)

log = logging.getLogger("titok.show")

NEGATIVE, MIDDLE, POSITIVE, NO_SCORE = (33, 102, 172), (247, 247, 247), (178, 24, 43), (190, 190, 190)
HISTOGRAM_BINS, COVERAGE_BINS, MAX_POINTS = 40, 20, 800


# --- numbers -----------------------------------------------------------------------------------

def colour(value, scale):
    """RGB of a value on the diverging scale: MIDDLE at 0, full colour at +-scale and beyond."""
    if value is None:
        return NO_SCORE
    t = max(-1.0, min(1.0, value / scale))
    end = POSITIVE if t > 0 else NEGATIVE
    return tuple(round(m + (e - m) * abs(t)) for m, e in zip(MIDDLE, end))


def ink(rgb):
    """Black or white text, whichever reads on this background."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def hex_colour(rgb):
    return "#%02x%02x%02x" % rgb


def checked_record(record, where):
    """(prompt messages, completion, source, target or None), every list checked against the text."""
    messages, completion = prompt_and_completion(record, where)
    source = source_scores(record, where)
    problem = offsets_problem(source.get("offsets"), len(completion))
    if problem:
        raise RecordError(where, "titok.source.offsets", f"the offsets {problem}")
    for field in ("excess", "mask"):
        _check_values(source, field, len(source["offsets"]), where, "titok.source")
    target = titok_part(record, "target")
    if target is not None:
        problem = offsets_problem(target.get("offsets"), len(completion))
        if problem:
            raise RecordError(where, "titok.target.offsets", f"the offsets {problem}")
        for field in ("score", "mask"):
            _check_values(target, field, len(target["offsets"]), where, "titok.target", nullable=field == "score")
        if "coverage" in target:
            check_number(target["coverage"], where, "titok.target.coverage")
    return messages, completion, source, target


def _check_values(part, field, n, where, name, nullable=False):
    """part[field], when present, must be n numbers (None allowed where nullable: unscored tokens)."""
    if field not in part:
        return
    values = part[field]
    if not isinstance(values, list) or len(values) != n:
        raise RecordError(where, f"{name}.{field}", f"{len(values) if isinstance(values, list) else 'no list of'} "
                                                    f"values for {n} tokens")
    check_numbers([0.0 if v is None else v for v in values] if nullable else values, where, f"{name}.{field}")


def _id_key(value):
    # numbers before strings, each in their own order
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


class DatasetNumbers:
    """Pass one: the floats the plots and the colour scale need, and the display order."""

    def __init__(self, pairs, sort="input", limit=None, keep_ids=False):
        self.excess = array("d")
        self.means, self.coverage, ids = array("d"), array("d"), []
        self.filter, self.models, self.tokens, self.selected = None, {}, 0, 0
        for where, record in pairs:
            _, _, source, target = checked_record(record, where)
            self.excess.extend(source["excess"])
            self.means.append(source["mean_excess"])
            self.tokens += len(source["excess"])
            self.selected += sum(source.get("mask") or ())
            settings = filter_settings(record)
            if settings and self.filter is None:
                self.filter = settings
            if target is not None:
                self.coverage.append(target.get("coverage", math.nan))
                self.models.setdefault("target", target.get("model"))
            self.models.setdefault("source", source.get("model"))
            if sort == "id":
                ids.append(_id_key(record["id"]))
        n = len(self.means)
        order = {"input": lambda: range(n), "excess": lambda: sorted(range(n), key=lambda i: -self.means[i]),
                 "id": lambda: sorted(range(n), key=lambda i: ids[i])}[sort]()
        shown = list(order)[:limit]
        self.position = {i: p for p, i in enumerate(shown)}  # record index -> place on the page
        values = np.abs(np.frombuffer(self.excess, dtype=np.float64))
        self.scale = float(np.percentile(values, 99)) if len(values) else 1.0
        self.scale = self.scale if self.scale > 0 else 1.0
        self.records = n


def pieces(completion, offsets):
    """Split the completion by token spans: yields ("gap", text) for characters no token covers
    and ("token", i, text, kind), kind "text", "more" (a byte piece sharing the previous token's
    span: its text was shown once already) or "end" (the closing token's empty span)."""
    position, previous = 0, None
    for i, (a, b) in enumerate(offsets):
        if (a, b) == previous and a < b:
            yield "token", i, "", "more"
            continue
        previous = (a, b)
        if a > position:
            yield "gap", completion[position:a]
            position = a
        if a == b:
            yield "token", i, "", "end"
            continue
        text = completion[max(a, position):b]
        yield "token", i, text, "text" if text else "more"
        position = max(position, b)
    if position < len(completion):
        yield "gap", completion[position:]


# --- HTML --------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 8px} h2{font-size:15px;margin:0 0 6px} h3{font-size:13px;margin:0 0 4px;color:#555}
.meta{color:#555} .plots{display:flex;flex-wrap:wrap;gap:16px;margin:10px 0}
.plot{border:1px solid #ddd;padding:6px} .plot svg{display:block} .plot p{margin:2px 0;font-size:12px;color:#555}
.legend{display:flex;align-items:center;gap:8px;font-size:12px;margin:6px 0}
.bar{width:240px;height:14px;border:1px solid #aaa}
#records{display:flex;flex-direction:column;gap:12px}
.rec{border:1px solid #ccc;border-radius:6px;padding:8px 10px}
.sides{display:flex;gap:12px} .side{flex:1;min-width:0}
.toks{white-space:pre-wrap;font:13px/1.9 ui-monospace,monospace;word-break:break-word}
.t{border-radius:2px;padding:1px 0;cursor:default}
.t.sel{text-decoration:underline 2px;text-underline-offset:3px;outline:1px solid #000}
.t.none{background:#bebebe;color:#000}
.t.more::before{content:"+";font-size:9px;vertical-align:super}
.t.end::before{content:"\\23CE";font-size:11px}
.t.hl{box-shadow:0 0 0 2px #f5b700;outline:2px solid #f5b700}
details{font-size:12px;color:#555} details pre{white-space:pre-wrap;margin:4px 0}
.js-stats{font-size:12px;color:#555;margin:4px 0 0}
"""

SCRIPT = """
for (const rec of document.querySelectorAll('section.rec')) {
  const toks = [...rec.querySelectorAll('.src .t')];
  const xs = toks.map(t => parseFloat(t.dataset.excess));
  const sel = toks.filter(t => t.dataset.sel === '1').length;
  const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
  const out = rec.querySelector('.js-stats');
  out.dataset.n = xs.length; out.dataset.selected = sel; out.dataset.mean = mean.toFixed(6);
  let text = `${xs.length} source tokens, ${sel} selected, mean excess ${mean.toFixed(6)}`;
  const tgt = [...rec.querySelectorAll('.tgt .t')];
  if (tgt.length) {
    const scored = tgt.filter(t => t.dataset.score !== 'null').length;
    out.dataset.coverage = (scored / tgt.length).toFixed(6);
    text += `; ${tgt.length} target tokens, coverage ${(100 * scored / tgt.length).toFixed(1)}%`;
  }
  out.textContent = text;
}
let lit = [];
document.addEventListener('mouseover', e => {
  for (const t of lit) t.classList.remove('hl');
  lit = [];
  const t = e.target.closest && e.target.closest('.t');
  if (!t || !t.dataset.o) return;
  const rec = t.closest('section.rec');
  const other = [...rec.querySelectorAll(t.closest('.src') ? '.tgt .t' : '.src .t')];
  const [lo, hi] = t.dataset.o.split('-').map(Number);
  lit = [t, ...other.slice(lo, hi)];
  for (const x of lit) x.classList.add('hl');
});
"""
# The page allows this one script, by its hash: record text (untrusted) cannot add another.
SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()


def _fmt(value):
    return "null" if value is None else repr(float(value))


def _svg(width, height, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-size="10" font-family="sans-serif">{body}</svg>')


def histogram_svg(values, scale, width=340, height=150):
    """Token excess histogram; tails past the 0.5/99.5 percentiles fall into the edge bins."""
    if not len(values):
        return "<p>no tokens</p>"
    lo, hi = (float(x) for x in np.percentile(values, [0.5, 99.5]))
    # One value, or values closer than float64 resolves at their size (1e17 and 1e17 + 16): numpy
    # cannot cut [x-1, x+1] into bins there ("Too many bins for data range"), so widen by the size.
    fine = max(abs(lo), abs(hi)) * 1e-9
    if hi - lo <= fine:
        middle, half, biggest = lo / 2 + hi / 2, max(1.0, fine), np.finfo(np.float64).max
        lo, hi = max(middle - half, -biggest), min(middle + half, biggest)
    # halved when hi - lo itself passes float64's range (scores of +-1e308), doubled back after
    shrink = 1.0 if np.isfinite(hi - lo) else 0.5
    counts, edges = np.histogram(np.clip(values, lo, hi) * shrink, bins=HISTOGRAM_BINS, range=(lo * shrink, hi * shrink))
    edges = edges / shrink
    plot_h, step, top = height - 28, width / HISTOGRAM_BINS, max(int(counts.max()), 1)
    body = []
    for j, c in enumerate(counts.tolist()):
        h = plot_h * c / top
        centre = edges[j] / 2 + edges[j + 1] / 2  # no overflow near float64's limit
        body.append(f'<rect class="bin" data-count="{c}" x="{j * step:.1f}" y="{plot_h - h + 12:.1f}" '
                    f'width="{max(step - 1, 1):.1f}" height="{h:.1f}" fill="{hex_colour(colour(centre, scale))}" '
                    f'stroke="#999" stroke-width="0.3"><title>{edges[j]:+.3f} to {edges[j + 1]:+.3f}: {c}</title></rect>')
    if lo < 0 < hi:
        x = width * -lo / (hi - lo)
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="10" y2="{plot_h + 12}" stroke="#000" stroke-dasharray="2 2"/>'
                    f'<text x="{x:.1f}" y="{height - 3}" text-anchor="middle">0</text>')
    body.append(f'<text x="0" y="{height - 3}">{lo:+.2f}</text><text x="{width}" y="{height - 3}" text-anchor="end">'
                f'{hi:+.2f}</text><text x="2" y="9">{top} tokens</text>')
    return _svg(width, height, "".join(body))


def means_svg(means, settings, width=340, height=150):
    """Mean excess per sample, sorted descending, with the keep-M cut of titok-filter."""
    n = len(means)
    if not n:
        return "<p>no samples</p>"
    order = np.argsort(-means, kind="stable")
    ranked = means[order]
    points = np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).round().astype(int))
    lo, hi = min(float(ranked.min()), 0.0), max(float(ranked.max()), 0.0)
    span = (hi - lo) or 1.0
    plot_h = height - 24

    def y(v):
        return 10 + plot_h * ((hi - v) / span)
    step, scale = width / len(points), max(abs(lo), abs(hi)) or 1.0
    body = [f'<rect x="{j * step:.2f}" y="{min(y(ranked[p]), y(0)):.1f}" width="{max(step, 0.5):.2f}" '
            f'height="{abs(y(ranked[p]) - y(0)):.1f}" fill="{hex_colour(colour(float(ranked[p]), scale))}"/>'
            for j, p in enumerate(points.tolist())]
    body.append(f'<line x1="0" x2="{width}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#000" stroke-width="0.5"/>')
    if settings and settings.get("rank_by", "excess") == "excess" and isinstance(settings.get("keep"), int):
        m = settings["keep"]
        x = width * min(m, n) / n
        body.append(f'<line class="cut" data-keep="{m}" x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height - 12}" '
                    f'stroke="#111" stroke-width="1.5" stroke-dasharray="4 2"/>'
                    f'<text x="{min(x + 3, width - 70):.1f}" y="{height - 14}">keep M = {m}</text>')
    body.append(f'<text x="2" y="{height - 2}">{hi:+.3f} (best)</text>'
                f'<text x="{width}" y="{height - 2}" text-anchor="end">{lo:+.3f}, {n} samples</text>')
    return _svg(width, height, "".join(body))


def coverage_svg(coverage, width=340, height=150):
    values = coverage[~np.isnan(coverage)]
    if not len(values):
        return "<p>no titok.target in these records: run titok-align to see the target side</p>"
    counts, _ = np.histogram(values, bins=COVERAGE_BINS, range=(0.0, 1.0))
    plot_h, step, top = height - 28, width / COVERAGE_BINS, max(int(counts.max()), 1)
    body = [f'<rect x="{j * step:.1f}" y="{plot_h - plot_h * c / top + 12:.1f}" width="{step - 1:.1f}" '
            f'height="{plot_h * c / top:.1f}" fill="#6a8caf"><title>{j / COVERAGE_BINS:.0%}-'
            f'{(j + 1) / COVERAGE_BINS:.0%}: {c}</title></rect>' for j, c in enumerate(counts.tolist())]
    body.append(f'<text x="0" y="{height - 3}">0%</text><text x="{width}" y="{height - 3}" text-anchor="end">100%</text>'
                f'<text x="2" y="9">{top} records</text>')
    return _svg(width, height, "".join(body))


def header_html(numbers, title):
    esc = html.escape
    s = numbers.scale
    means = np.frombuffer(numbers.means, dtype=np.float64)
    coverage = np.frombuffer(numbers.coverage, dtype=np.float64)
    mean = float((means / len(means)).sum()) if len(means) else math.nan  # a sum of 1e308s would overflow
    settings = numbers.filter or {}
    facts = [f"{numbers.records} records", f"{numbers.tokens} source tokens",
             f"{numbers.selected} selected", f"mean excess {mean:+.4f}"]
    if settings:
        facts.append("filter: " + ", ".join(f"{key} {esc(str(settings[key]))}" for key in ("k", "keep", "scope", "rank_by")
                                            if key in settings))
    models = ", ".join(f"{side} {esc(str(name))}" for side, name in numbers.models.items() if name)
    shown = len(numbers.position)
    gradient = f"linear-gradient(to right,{hex_colour(NEGATIVE)},{hex_colour(MIDDLE)},{hex_colour(POSITIVE)})"
    coverage_note = (f"<p>mean coverage {float(np.nanmean(coverage)):.1%} over {len(coverage)} records</p>"
                     if len(coverage) else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src '{SCRIPT_HASH}'; img-src data:">
<style>{STYLE}</style></head><body>
<h1>{esc(title)}</h1>
<p class="meta" id="facts" data-records="{numbers.records}" data-tokens="{numbers.tokens}" data-selected="{numbers.selected}">
{" · ".join(facts)}{"<br>" + models if models else ""}<br>showing {shown} of {numbers.records} records</p>
<div class="legend" id="legend" data-scale="{s!r}"><span>excess</span><span>{-s:+.3f}</span>
<span class="bar" style="background:{gradient}"></span><span>{s:+.3f}</span>
<span>(99th percentile of |excess|; beyond it clipped)</span>
<span class="t sel" style="background:#fff">selected</span><span class="t none">no score</span>
<span class="t more" style="background:#fff"></span><span>byte piece of the previous span</span>
<span class="t end" style="background:#fff"></span><span>end of turn</span></div>
<div class="plots">
<div class="plot" id="plot-excess"><p>token excess</p>{histogram_svg(np.frombuffer(numbers.excess, dtype=np.float64), s)}</div>
<div class="plot" id="plot-means"><p>mean excess per sample, sorted</p>{means_svg(means, numbers.filter)}</div>
<div class="plot" id="plot-coverage"><p>alignment coverage per record</p>{coverage_svg(coverage)}{coverage_note}</div>
</div>
<div id="records">
"""


def tokens_html(completion, offsets, values, mask, scale, other_ranges, value_name):
    esc = html.escape
    out = []
    for piece in pieces(completion, offsets):
        if piece[0] == "gap":
            out.append(esc(piece[1]))
            continue
        _, i, text, kind = piece
        value = values[i]
        classes = ["t"] + ([kind] if kind != "text" else []) + (["sel"] if mask and mask[i] else []) + \
                  (["none"] if value is None else [])
        style = "" if value is None else f' style="background:{hex_colour(colour(value, scale))};color:{hex_colour(ink(colour(value, scale)))}"'
        a, b = offsets[i]
        label = f"#{i} {value_name} " + ("no score" if value is None else f"{value:+.4f}") + (" selected" if mask and mask[i] else "")
        related = f' data-o="{other_ranges[0][i]}-{other_ranges[1][i]}"' if other_ranges is not None else ""
        out.append(f'<span class="{" ".join(classes)}" data-i="{i}" data-{value_name}="{_fmt(value)}" '
                   f'data-sel="{int(bool(mask and mask[i]))}" data-a="{a}" data-b="{b}"{related}{style} '
                   f'title="{esc(label)}">{esc(text)}</span>')
    return "".join(out)


def record_html(record, where, place, scale):
    esc = html.escape
    messages, completion, source, target = checked_record(record, where)
    settings = filter_settings(record)  # its values are text from outside too: escaped below
    facts = [f"mean excess {source['mean_excess']:+.4f}"]
    if settings:
        facts.append(f"rank {esc(str(settings.get('rank')))}" + ("" if settings.get("kept", True) else " (dropped)"))
    if target is not None and isinstance(target.get("coverage"), (int, float)):
        facts.append(f"coverage {target['coverage']:.1%}")
    if source.get("truncated"):
        facts.append("truncated")
    src_ranges = tgt_ranges = None
    if target is not None:
        length = len(completion)
        src_spans, tgt_spans = as_spans(source["offsets"]), as_spans(target["offsets"])
        tgt_ranges = [r.tolist() for r in overlap_ranges(src_spans, tgt_spans, length)]  # sources per target
        src_ranges = [r.tolist() for r in overlap_ranges(tgt_spans, src_spans, length)]  # targets per source
    prompt = "\n\n".join(f"[{m.get('role')}] {m['content']}" for m in messages)
    sides = [f'<div class="side src"><h3>source {esc(str(source.get("model") or ""))}: excess</h3><div class="toks">'
             f'{tokens_html(completion, source["offsets"], source["excess"], source.get("mask"), scale, src_ranges, "excess")}'
             f'</div></div>']
    if target is not None:
        sides.append(f'<div class="side tgt"><h3>target {esc(str(target.get("model") or ""))}: aligned score</h3>'
                     f'<div class="toks">{tokens_html(completion, target["offsets"], target.get("score") or [None] * len(target["offsets"]), target.get("mask"), scale, tgt_ranges, "score")}'
                     f'</div></div>')
    return (f'<section class="rec" style="order:{place}" data-place="{place}" data-id="{esc(str(record["id"]))}" '
            f'data-mean="{_fmt(source["mean_excess"])}">\n<h2>#{place + 1} · id {esc(str(record["id"]))} · '
            f'{" · ".join(facts)}</h2>\n<details><summary>prompt</summary><pre>{esc(prompt)}</pre></details>\n'
            f'<div class="sides">{"".join(sides)}</div><p class="js-stats"></p></section>\n')


def write_html(read, out, sort="input", limit=None, title="titok-show"):
    """The page for the records of `read()` (called twice), written piece by piece to `out`."""
    numbers = DatasetNumbers(read(), sort, limit)
    out.write(header_html(numbers, title))
    for i, (where, record) in enumerate(read()):
        if i in numbers.position:
            out.write(record_html(record, where, numbers.position[i], numbers.scale))
    out.write(f"</div>\n<script>{SCRIPT}</script>\n</body></html>\n")
    return numbers


# --- terminal ----------------------------------------------------------------------------------

RESET = "\x1b[0m"


def printable(text):
    """Control characters shown as escapes: a completion must not drive the terminal."""
    return "".join(c if c in "\n\t" or (c >= " " and not "\x7f" <= c <= "\x9f") else f"\\x{ord(c):02x}" for c in text)


def ansi_paint(text, rgb, selected=False):
    fg = ink(rgb)
    start = f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m" + ("\x1b[4m" if selected else "")
    # colour each line on its own: less -R and terminals do not carry it across a newline well
    return "\n".join(start + line + RESET if line else line for line in text.split("\n"))


def tokens_ansi(completion, offsets, values, mask, scale):
    out = []
    for piece in pieces(completion, offsets):
        if piece[0] == "gap":
            out.append(printable(piece[1]))
            continue
        _, i, text, kind = piece
        if kind == "more":
            continue  # the span was painted with the first piece's colour
        out.append(ansi_paint("\u23ce" if kind == "end" else printable(text), colour(values[i], scale),
                              bool(mask and mask[i])))
    return "".join(out)


def legend_ansi(numbers):
    s = numbers.scale
    steps = "".join(ansi_paint("  ", colour(s * (j - 5) / 5, s)) for j in range(11))
    return (f"titok-show: {numbers.records} records, {numbers.tokens} source tokens, {numbers.selected} selected; "
            f"showing {len(numbers.position)}\nexcess {-s:+.3f} {steps} {s:+.3f}   "
            f"{ansi_paint('selected', MIDDLE, True)}  {ansi_paint('no score', NO_SCORE)}\n")


def record_ansi(record, where, place, scale):
    _, completion, source, target = checked_record(record, where)
    settings = filter_settings(record)
    head = f"━━ #{place + 1} id {printable(str(record['id']))} · mean excess {source['mean_excess']:+.4f}"
    if settings:
        head += f" · rank {printable(str(settings.get('rank')))}" + ("" if settings.get("kept", True) else " (dropped)")
    lines = [head, f"source {printable(str(source.get('model') or ''))}:",
             tokens_ansi(completion, source["offsets"], source["excess"], source.get("mask"), scale)]
    if target is not None:
        scores = target.get("score") or [None] * len(target["offsets"])
        lines += [f"target {printable(str(target.get('model') or ''))} (coverage {target.get('coverage', 0):.1%}):",
                  tokens_ansi(completion, target["offsets"], scores, target.get("mask"), scale)]
    return "\n".join(lines) + "\n\n"


def write_ansi(read, out, sort="input", limit=None):
    numbers = DatasetNumbers(read(), sort, limit)
    out.write(legend_ansi(numbers) + "\n")
    held = {}
    for i, (where, record) in enumerate(read()):
        place = numbers.position.get(i)
        if place is None:
            continue
        text = record_ansi(record, where, place, numbers.scale)
        if sort == "input":
            out.write(text)
        else:
            held[place] = text  # only the shown records' text, to print them in order
    for place in sorted(held):
        out.write(held[place])
    return numbers


# --- command -----------------------------------------------------------------------------------

@click.command()
@cli.input_argument
@click.option("-o", "--output", default="-", show_default=True, type=click.Path(allow_dash=True, dir_okay=False),
              help="Write the page here ('-' = stdout); a file appears only when the page is complete.")
@click.option("--limit", type=click.IntRange(min=0), help="Show only the first N records (in --sort order); "
                                                           "the dataset plots still cover every record.")
@click.option("--sort", type=click.Choice(["input", "excess", "id"]), default="input", show_default=True,
              help="Order of the records: as in the input, by mean excess (best first), or by id.")
@click.option("--ansi", is_flag=True, help="Print coloured text for the terminal (24-bit ANSI colours; use less -R) "
                                           "instead of HTML.")
@click.option("--title", default="titok-show", show_default=True, help="Title of the page.")
@cli.command
def main(input, output, limit, sort, ansi, title):
    """Show scored (filtered, aligned) records: tokens coloured by excess, selected ones underlined.

    Writes one self-contained HTML page (no network: inline CSS, JS and SVG) with the dataset's
    token-excess histogram, sorted mean excess per sample with the keep-M cut, and alignment
    coverage; then per record the completion's tokens coloured by excess (blue < 0 < red,
    legend at the top), and the target's tokens beside them when titok-align ran (hover a
    token to see the tokens it overlaps on the other side). --ansi prints the same colours
    to the terminal.

    \b
    Examples:
      titok-show scored.jsonl > report.html
      titok-show --sort excess --limit 50 -o report.html aligned.jsonl
      titok-show --ansi --limit 5 aligned.jsonl | less -R
    """
    with spooled(input) as path, text_output(output) as out:
        name = "<stdin>" if input == "-" else input

        def read():
            return read_records(path, name=name)
        numbers = write_ansi(read, out, sort, limit) if ansi else write_html(read, out, sort, limit, title)
    log.info("showed %d of %d records", len(numbers.position), numbers.records)


if __name__ == "__main__":
    main()
