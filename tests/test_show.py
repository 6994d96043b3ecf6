"""titok-show: the page's numbers are the records' numbers, hostile text is escaped, --limit/--sort
order the cards, --ansi paints the same colours, and a real headless Chromium renders the page."""
import random
import re
import shutil
import subprocess
import sys
import zlib
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from conftest import run_pipe, write_jsonl
from titok_tools.align import align_records
from titok_tools.formatting import encode
from titok_tools.select import topk_mask
from titok_tools.show import colour, main

HOSTILE = "</pre><script>alert('pwned')</script> & <b>bold</b>\x1b[31m red"
COMPLETIONS = [
    "The answer is 42.\nBecause six times seven is forty-two.",
    "Emoji split into byte pieces: 🦙🚀 and café, naïve, 東京.",
    HOSTILE,
    "  Leading spaces, tabs\tand a final newline\n",
    "Short.",
]


def scored_records(tokenizer, ids=None):
    """Records as titok-score + titok-filter would write them, without a model: real token
    offsets from formatting.encode, synthetic excess values."""
    rng = random.Random(0)
    records = []
    for i, completion in enumerate(COMPLETIONS):
        messages = [{"role": "user", "content": f"Question {i}?"}]
        enc = encode(tokenizer, messages, completion)
        excess = [round(rng.gauss(0.1 * i - 0.2, 1.0), 4) for _ in enc.offsets]
        records.append({"id": ids[i] if ids else f"r{i}", "prompt": messages, "completion": completion,
                        "titok": {"source": {"model": "smollm2", "token_ids": enc.token_ids, "offsets": enc.offsets,
                                             "excess": excess, "mean_excess": sum(excess) / len(excess),
                                             "mask": topk_mask(excess, 0.5)}}})
    ranks = sorted(range(len(records)), key=lambda i: -records[i]["titok"]["source"]["mean_excess"])
    for rank, i in enumerate(ranks, 1):
        records[i]["titok"]["filter"] = {"k": 0.5, "keep": 3, "scope": "sample", "rank": rank, "kept": rank <= 3}
    return records


@pytest.fixture(scope="module")
def records(smollm2_tokenizer):
    return scored_records(smollm2_tokenizer)


@pytest.fixture(scope="module")
def aligned(records, gemma_tokenizer):
    import copy
    records = copy.deepcopy(records)
    for record in records:  # titok-align leaves records titok-filter did not keep without a target
        record["titok"]["filter"]["kept"] = True
    pairs = ((f"in:{i}", r) for i, r in enumerate(records))
    return list(align_records(pairs, gemma_tokenizer, model="gemma", k=0.5))


class Page(HTMLParser):
    """The cards of a page: per section its attributes, and per side its token spans and text."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.sections, self.side, self.token, self.in_tokens, self.scripts, self.elements = [], None, None, False, 0, {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if attrs.get("id"):
            self.elements[attrs["id"]] = attrs
        if tag == "script":
            self.scripts += 1
        if tag == "line" and "cut" in classes:
            self.elements["cut"] = attrs
        if tag == "rect" and "bin" in classes:
            self.elements.setdefault("bins", []).append(int(attrs["data-count"]))
        if tag == "section":
            self.sections.append({"attrs": attrs, "src": [], "tgt": [], "text": {"src": "", "tgt": ""}})
        elif tag == "div" and ("src" in classes or "tgt" in classes):
            self.side = "src" if "src" in classes else "tgt"
        elif tag == "div" and "toks" in classes:
            self.in_tokens = True
        elif tag == "p" and "js-stats" in classes and self.sections:
            self.sections[-1]["stats"] = attrs
        if tag == "span" and "t" in classes and self.side:
            self.token = dict(attrs, classes=classes, text="")
            self.sections[-1][self.side].append(self.token)

    def handle_endtag(self, tag):
        if tag == "div":
            self.in_tokens = False
        if tag == "span":
            self.token = None
        if tag == "section":
            self.side = None

    def handle_data(self, data):
        if self.token is not None:
            self.token["text"] += data
        if self.in_tokens:
            self.sections[-1]["text"][self.side] += data


def show(path, *args):
    result = CliRunner().invoke(main, [*args, str(path)])
    assert result.exit_code == 0, result.output
    return result.stdout


def number(value):
    return None if value == "null" else float(value)


def test_page_numbers_match_the_records(tmp_path, aligned):
    page = Page(show(write_jsonl(tmp_path / "in.jsonl", aligned)))
    assert len(page.sections) == len(aligned) and page.scripts == 1
    for section, record in zip(page.sections, aligned):
        source, target = record["titok"]["source"], record["titok"]["target"]
        assert section["attrs"]["data-id"] == record["id"]
        assert number(section["attrs"]["data-mean"]) == source["mean_excess"]
        assert [number(t["data-excess"]) for t in section["src"]] == source["excess"]
        assert [int(t["data-sel"]) for t in section["src"]] == source["mask"]
        assert all(("sel" in t["classes"]) == bool(m) for t, m in zip(section["src"], source["mask"]))
        assert [f"{v:+.4f}" in t["title"] for t, v in zip(section["src"], source["excess"])] == [True] * len(source["excess"])
        assert [number(t["data-score"]) for t in section["tgt"]] == target["score"]
        assert [int(t["data-sel"]) for t in section["tgt"]] == target["mask"]
        assert all(("none" in t["classes"]) == (s is None) for t, s in zip(section["tgt"], target["score"]))
        # both sides show the completion's own characters, each character once
        assert section["text"]["src"] == section["text"]["tgt"] == record["completion"]
        # hover: a target token lights exactly the source tokens whose spans overlap it
        for t in section["tgt"]:
            lo, hi = map(int, t["data-o"].split("-"))
            a, b = int(t["data-a"]), int(t["data-b"])
            expected = [j for j, (c, d) in enumerate(source["offsets"])
                        if (c < b and d > a) or (a == b == c == d == len(record["completion"]))]
            assert list(range(lo, hi)) == expected
    facts = page.elements["facts"]
    assert int(facts["data-records"]) == 5 and int(facts["data-tokens"]) == sum(len(r["titok"]["source"]["excess"]) for r in aligned)
    assert sum(page.elements["bins"]) == int(facts["data-tokens"])  # the histogram counts every token
    assert page.elements["cut"]["data-keep"] == "3"


def test_byte_pieces_show_their_span_once(tmp_path, records):
    page = Page(show(write_jsonl(tmp_path / "in.jsonl", records)))
    emoji = page.sections[1]["src"]
    more = [t for t in emoji if "more" in t["classes"]]
    assert more and all(t["text"] == "" for t in more)  # 🦙 is several byte tokens on one span
    for j, t in enumerate(emoji):  # a byte piece adds no text: its span was shown by the tokens before it
        shown = max(int(p["data-b"]) for p in emoji[:j]) if j else 0
        assert ("more" in t["classes"]) == (int(t["data-b"]) <= shown and t["data-a"] != t["data-b"])
    assert "end" in emoji[-1]["classes"] and emoji[-1]["data-a"] == emoji[-1]["data-b"]  # the closing token
    assert "no titok.target" in show(write_jsonl(tmp_path / "in.jsonl", records))


def test_hostile_text_is_escaped(tmp_path, smollm2_tokenizer):
    records = scored_records(smollm2_tokenizer, ids=[0, 1, '"><img src=x onerror=alert(1)>', 3, 4])
    page = show(write_jsonl(tmp_path / "in.jsonl", records), "--title", "<i>t</i>")
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>bold" not in page and "<i>t" not in page
    assert page.count("<script>") == 1
    parsed = Page(page)
    assert parsed.sections[2]["text"]["src"] == HOSTILE
    assert parsed.sections[2]["attrs"]["data-id"] == '"><img src=x onerror=alert(1)>'
    # every field of a record is text from outside, the filter's too; and the page runs only its own script
    records[1]["titok"]["filter"]["rank"] = "<script>alert('rank')</script>\x1b[2J"
    path = write_jsonl(tmp_path / "rank.jsonl", records)
    page = show(path)
    assert "<script>alert" not in page and page.count("<script>") == 1 and "&lt;script&gt;alert(&#x27;rank" in page
    assert "'unsafe-inline'; img-src" not in page and "script-src 'sha256-" in page
    terminal = show(path, "--ansi")
    assert "\x1b[2J" not in terminal and "<script>alert('rank')</script>\\x1b[2J" in ANSI.sub("", terminal)


def test_limit_and_sort(tmp_path, records):
    path = write_jsonl(tmp_path / "in.jsonl", records)
    means = {r["id"]: r["titok"]["source"]["mean_excess"] for r in records}
    page = Page(show(path, "--sort", "excess", "--limit", "2"))
    best = sorted(means, key=lambda i: -means[i])[:2]
    assert {s["attrs"]["data-id"]: int(s["attrs"]["data-place"]) for s in page.sections} == {best[0]: 0, best[1]: 1}
    assert all(f"order:{s['attrs']['data-place']}" in s["attrs"]["style"] for s in page.sections)
    assert page.elements["facts"]["data-records"] == "5"  # the plots still cover every record
    reverse = [dict(r, id=f"z{9 - i}") for i, r in enumerate(records)]
    page = Page(show(write_jsonl(tmp_path / "rev.jsonl", reverse), "--sort", "id"))
    assert sorted((int(s["attrs"]["data-place"]), s["attrs"]["data-id"]) for s in page.sections) == \
        list(enumerate(sorted(r["id"] for r in reverse)))
    assert Page(show(path, "--limit", "0")).sections == []


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_ansi_paints_the_same_colours(tmp_path, aligned):
    path = write_jsonl(tmp_path / "in.jsonl", aligned)
    out = show(path, "--ansi")
    source = aligned[0]["titok"]["source"]
    r, g, b = colour(source["excess"][0], float(re.search(r"excess ([-+0-9.]+) ", out).group(1).lstrip("-+")) or 1)
    first = aligned[0]["completion"][slice(*source["offsets"][0])]
    assert f"\x1b[48;2;{r};{g};{b}m" in out.split(first)[0].rsplit("\n", 1)[-1]  # its token's own colour
    assert "\x1b[4m" in out  # selected tokens underlined
    plain = ANSI.sub("", out)
    assert "Because six times seven is forty-two." in plain and "東京" in plain
    assert "\\x1b[31m red" in plain and "\x1b[31m" not in out  # a completion cannot drive the terminal
    assert plain.count("target gemma") == 5
    ranked = ANSI.sub("", show(path, "--ansi", "--sort", "excess", "--limit", "2"))
    best = sorted(aligned, key=lambda r: -r["titok"]["source"]["mean_excess"])[:2]
    assert re.findall(r"━━ #\d id (\S+)", ranked) == [r["id"] for r in best]


def test_stdin_pipe_output_file_and_bad_input(tmp_path, records):
    data = b"".join(open(write_jsonl(tmp_path / "in.jsonl", records), "rb"))
    out, _, err = run_pipe([sys.executable, "-m", "titok_tools.show", "--limit", "1", "-"], input=data)
    assert len(Page(out.decode()).sections) == 1 and "showed 1 of 5 records" in err
    target = tmp_path / "report.html"
    show(tmp_path / "in.jsonl", "-o", target)
    assert len(Page(target.read_text()).sections) == 5 and not list(tmp_path.glob(".titok-show-*"))
    bad = write_jsonl(tmp_path / "bad.jsonl", records[:1] + [{"id": "x", "prompt": "p", "completion": "c"}])
    result = CliRunner().invoke(main, ["-o", str(tmp_path / "bad.html"), bad])
    assert result.exit_code == 1 and "bad.jsonl:2: titok.source: missing: run titok-score first" in result.output
    assert not (tmp_path / "bad.html").exists() and not list(tmp_path.glob(".titok-show-*"))
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert all(flag in help_text for flag in ("--limit", "--sort", "--ansi", "--output", "--title"))


@pytest.mark.parametrize("part, field, value, message", [
    ("target", "coverage", None, "titok.target.coverage: must be a number, not null"),
    ("target", "score", "x", 'titok.target.score[0]: must be a number, not "x"'),
    ("source", "mask", "1", 'titok.source.mask[0]: must be a number, not "1"'),
    ("target", "mask", [1], "titok.target.mask: 1 values for"),
])
@pytest.mark.parametrize("ansi", [[], ["--ansi"]])
def test_malformed_per_token_fields_are_one_line_errors(tmp_path, aligned, part, field, value, message, ansi):
    import copy
    broken = copy.deepcopy(aligned[:2])
    values = broken[1]["titok"][part]
    if isinstance(value, list) or field == "coverage":
        values[field] = value
    else:
        values[field][0] = value
    result = CliRunner().invoke(main, [*ansi, write_jsonl(tmp_path / "bad.jsonl", broken)])
    assert result.exit_code == 1 and f"bad.jsonl:2: {message}" in result.output and "Traceback" not in result.output


# --- a real browser ----------------------------------------------------------------------------

def png_pixels(path):
    """(width, height, channels, rows as bytearrays) of an 8-bit RGB(A) PNG, standard library only."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
            depth, colour_type = body[8], body[9]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert depth == 8 and colour_type in (2, 6)
    channels = 3 if colour_type == 2 else 4
    raw, stride, rows, previous = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 2:
            row = bytearray((a + b) & 255 for a, b in zip(row, previous))
        elif kind in (1, 3, 4):
            for x in range(stride):
                left = row[x - channels] if x >= channels else 0
                up = previous[x]
                if kind == 1:
                    row[x] = (row[x] + left) & 255
                elif kind == 3:
                    row[x] = (row[x] + (left + up) // 2) & 255
                else:
                    upleft = previous[x - channels] if x >= channels else 0
                    p = left + up - upleft
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                    row[x] = (row[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else upleft)) & 255
        rows.append(row)
        previous = row
    return width, height, channels, rows


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_headless_chromium_renders_the_page(tmp_path, aligned):
    page = tmp_path / "report.html"
    show(write_jsonl(tmp_path / "in.jsonl", aligned), "-o", page)
    url = page.as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run(BROWSER + [f"--user-data-dir={tmp_path / 'profile1'}", f"--screenshot={shot}",
                              "--window-size=1200,900", url], check=True, capture_output=True, timeout=60)
    width, height, channels, rows = png_pixels(shot)
    assert (width, height) == (1200, 900)
    colours = {bytes(row[x:x + 3]) for row in rows[::3] for x in range(0, width * channels, channels * 2)}
    assert len(colours) > 50  # text, the legend gradient, coloured tokens: not a blank page
    reds = {c for c in colours if c[0] > 200 and c[1] < 140 and c[2] < 140}
    blues = {c for c in colours if c[2] > 190 and c[0] < 140}
    assert reds and blues  # both ends of the diverging scale are on screen
    # the DOM after the script ran: its per-record numbers, computed from the data-* attributes
    dom = subprocess.run(BROWSER + [f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", url],
                         check=True, capture_output=True, timeout=60).stdout.decode()
    parsed = Page(dom)
    assert len(parsed.sections) == len(aligned)
    for section, record in zip(parsed.sections, aligned):
        source, target = record["titok"]["source"], record["titok"]["target"]
        stats = section["stats"]
        assert int(stats["data-n"]) == len(source["excess"]) and int(stats["data-selected"]) == sum(source["mask"])
        assert float(stats["data-mean"]) == pytest.approx(sum(source["excess"]) / len(source["excess"]), abs=1e-6)
        assert float(stats["data-coverage"]) == pytest.approx(target["coverage"], abs=1e-6)


@pytest.mark.parametrize("value", [1e17, 1e308, -1.7976931348623157e308, 0.0])
def test_histogram_of_one_value_at_any_magnitude(tmp_path, records, value):
    # every token the same score: numpy could not cut [x-1, x+1] into bins at 1e17 and beyond
    import copy
    same = copy.deepcopy(records)
    for record in same:
        source = record["titok"]["source"]
        source["excess"] = [value] * len(source["excess"])
        source["mean_excess"] = value
    page = Page(show(write_jsonl(tmp_path / "in.jsonl", same)))
    assert sum(page.elements["bins"]) == int(page.elements["facts"]["data-tokens"])
    assert max(page.elements["bins"]) == int(page.elements["facts"]["data-tokens"])  # one bin holds them all


def test_colours_scale_and_selected_count(tmp_path, records):
    import copy
    from titok_tools.show import MIDDLE, NEGATIVE, POSITIVE
    # red for excess the expert adds, blue for what it takes away, grey at 0
    assert (POSITIVE, NEGATIVE, MIDDLE) == ((178, 24, 43), (33, 102, 172), (247, 247, 247))
    assert colour(2.0, 2.0) == POSITIVE and colour(-5.0, 2.0) == NEGATIVE and colour(0.0, 2.0) == MIDDLE
    assert colour(1.0, 2.0) == tuple(round(m + (p - m) / 2) for m, p in zip(MIDDLE, POSITIVE))
    # the scale is the 99th percentile of |excess| (one outlier does not wash out every colour),
    # and "selected" counts the mask's ones, not the tokens
    one = copy.deepcopy(records[0])
    source = one["titok"]["source"]
    n = len(source["offsets"])
    source["excess"] = [-0.1 * (i + 1) for i in range(n - 1)] + [50.0]
    source["mask"] = [1, 0, 1] + [0] * (n - 3)
    source["mean_excess"] = sum(source["excess"]) / n
    page = Page(show(write_jsonl(tmp_path / "in.jsonl", [one])))
    values = sorted(abs(v) for v in source["excess"])
    at = 0.99 * (n - 1)  # numpy's default (linear) percentile, by hand
    expected = values[int(at)] + (values[int(at) + 1] - values[int(at)]) * (at - int(at))
    assert float(page.elements["legend"]["data-scale"]) == pytest.approx(expected) and expected < 50
    assert int(page.elements["facts"]["data-selected"]) == 2


def test_histogram_of_a_narrow_range_uses_every_bin_and_huge_scores_of_both_signs_work(tmp_path, records):
    # scores within 0.05 of each other get 40 bins over their own range (a widening to at least
    # 1 once left 37 of 40 bins empty), and +-1e308 (a range past float64's) still draws
    import copy
    from titok_tools.show import HISTOGRAM_BINS
    narrow, huge = copy.deepcopy(records), copy.deepcopy(records)
    for i, (a, b) in enumerate(zip(narrow, huge)):
        n = len(a["titok"]["source"]["excess"])
        a["titok"]["source"]["excess"] = [0.05 * (i * n + j) / (5 * n) for j in range(n)]
        b["titok"]["source"]["excess"] = [(-1) ** j * 1e308 for j in range(n)]
    page = Page(show(write_jsonl(tmp_path / "narrow.jsonl", narrow)))
    assert len(page.elements["bins"]) == HISTOGRAM_BINS and sum(c > 0 for c in page.elements["bins"]) >= 35
    page = Page(show(write_jsonl(tmp_path / "huge.jsonl", huge)))
    bins = page.elements["bins"]
    assert sum(bins) == int(page.elements["facts"]["data-tokens"]) and bins[0] > 0 and bins[-1] > 0
