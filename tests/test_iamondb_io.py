"""IAM-OnDB on disk: reading files in the real format, writing them, and failing well.

Fixtures are hand-written strings in the format described in iam_handwriting.py ("IAM-OnDB:
reading the database"), so the reader is checked against the format itself, not only against
our writer. The last section exports rendered cursive lines (the lines task) and reads them
back through the same loader and preprocessing as the real database.
"""
import builtins
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import iam_handwriting as ih
from iam_handwriting import Form, IamOnDbError

# ---------------------------------------------------------------------------
# Hand-written fixtures in the real format
# ---------------------------------------------------------------------------

REFERENCE_LINE = """<?xml version="1.0" encoding="ISO-8859-1"?>
<WhiteboardCaptureSession>
  <WhiteboardDescription>
    <SensorLocation corner="top_left"/>
    <DiagonallyOppositeCoords x="6512" y="1376"/>
    <VerticallyOppositeCoords x="966" y="1376"/>
    <HorizontallyOppositeCoords x="6512" y="787"/>
  </WhiteboardDescription>
  <StrokeSet>
    <Stroke colour="black" start_time="769.05" end_time="769.09">
      <Point x="1073" y="1058" time="769.05"/>
      <Point x="1072" y="1085" time="769.07"/>
      <Point x="1074" y="1110" time="769.09"/>
    </Stroke>
  </StrokeSet>
</WhiteboardCaptureSession>
"""

# Two strokes, an empty one between them, and only the diagonal corner (seen in public docs).
TWO_STROKE_LINE = """<?xml version="1.0" encoding="ISO-8859-1"?>
<WhiteboardCaptureSession>
  <WhiteboardDescription>
    <SensorLocation corner="top_left"/>
    <DiagonallyOppositeCoords x="6512" y="1376"/>
  </WhiteboardDescription>
  <StrokeSet>
    <Stroke colour="black" start_time="770.01" end_time="770.03">
      <Point x="1200" y="1060" time="770.01"/>
      <Point x="1210" y="1070" time="770.03"/>
    </Stroke>
    <Stroke colour="black" start_time="770.10" end_time="770.10">
    </Stroke>
    <Stroke colour="black" start_time="770.25" end_time="770.25">
      <Point x="1250" y="1000" time="770.25"/>
    </Stroke>
  </StrokeSet>
</WhiteboardCaptureSession>
"""

# CSR line 1 has trailing blanks, line 2 ends in the marker, line 3 has an ISO-8859-1 'é'.
A01_000U_ASCII = """OCR:

A MOVE to stop Mr. Gaitskell from
nominating any more Labour life Peers

CSR:

A MOVE to stop Mr. Gaitskell   
from nominating any more%%%%%%%%%%%
Labour café Peers
"""

A01_000U_ORIGINAL = """<?xml version="1.0" encoding="ISO-8859-1"?>
<WhiteboardCaptureSession>
  <General>
    <Form writerID="10020"/>
  </General>
  <Transcription>
    <TextLine id="a01-000u-01" text="A MOVE to stop Mr. Gaitskell"/>
  </Transcription>
</WhiteboardCaptureSession>
"""


def write_text(path, text, encoding="iso-8859-1"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode(encoding))


def one_line_ascii(text):
    return f"OCR:\n\n{text}\n\nCSR:\n\n{text}\n"


def write_reference_db(root):
    """Four forms, one per split, with every writer-id source; one form in no split."""
    root = str(root)
    strokes = os.path.join(root, "lineStrokes")
    write_text(f"{strokes}/a01/a01-000/a01-000u-01.xml", REFERENCE_LINE)
    write_text(f"{strokes}/a01/a01-000/a01-000u-02.xml", TWO_STROKE_LINE)
    write_text(f"{strokes}/a01/a01-000/a01-000u-03.xml", REFERENCE_LINE)
    write_text(f"{root}/ascii/a01/a01-000/a01-000u.txt", A01_000U_ASCII)
    write_text(f"{root}/original/a01/a01-000/strokesu.xml", A01_000U_ORIGINAL)
    # validation: writer from its own original file
    write_text(f"{strokes}/a01/a01-000/a01-000x-01.xml", REFERENCE_LINE)
    write_text(f"{root}/ascii/a01/a01-000/a01-000x.txt", one_line_ascii("A MOVE"))
    write_text(f"{root}/original/a01/a01-000/strokesx.xml", A01_000U_ORIGINAL.replace("10020", "10021"))
    # validation2: a form id without copy letter, writer only in forms.txt
    write_text(f"{strokes}/d04/d04-081/d04-081-01.xml", TWO_STROKE_LINE)
    write_text(f"{root}/ascii/d04/d04-081/d04-081.txt", one_line_ascii("seen by"))
    write_text(f"{root}/forms.txt", "# form writer\nd04-081 10158\n")
    # test: no writer anywhere, so the form id stands in
    write_text(f"{strokes}/f07/f07-088/f07-088b-01.xml", REFERENCE_LINE)
    write_text(f"{root}/ascii/f07/f07-088/f07-088b.txt", one_line_ascii("the end."))
    # in no split file: ignored
    write_text(f"{strokes}/b01/b01-113/b01-113-01.xml", REFERENCE_LINE)
    write_text(f"{root}/ascii/b01/b01-113/b01-113.txt", one_line_ascii("unused"))
    # split entries start with a space in the real files; blank lines and CRLF are tolerated
    write_text(f"{root}/trainset.txt", " a01-000u\n")
    write_text(f"{root}/testset_v.txt", " a01-000x\n\n")
    write_text(f"{root}/testset_t.txt", " d04-081\r\n")
    write_text(f"{root}/testset_f.txt", " f07-088b\n")
    return root


def quiet(_text):
    pass


REFERENCE_POINTS = np.array([[1073, 1058], [1072, 1085], [1074, 1110]], dtype=float)
REFERENCE_TIMES = np.array([769.05, 769.07, 769.09])
TWO_STROKE_POINTS = np.array([[1200, 1060], [1210, 1070], [1250, 1000]], dtype=float)


def random_forms(n_lines, points_per_line, seed=0):
    """(forms, splits): random-walk ink, 8 lines a form, the forms dealt round-robin over the
    four splits (none empty). Not handwriting: it exercises the reader and the writer only."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    words = "the of and to a in is was he for it with as his on be at by had".split()
    forms, splits = [], {split: [] for split in ih.IAM_SPLIT_FILES}
    names = list(ih.IAM_SPLIT_FILES)
    for start in range(0, n_lines, 8):
        form_id = f"r{start // 800:02d}-{start // 8 % 100:03d}{'uvwxyz'[start // 8 % 6]}"
        lines = []
        for _ in range(min(8, n_lines - start)):
            text = " ".join(rng.choice(words, size=rng.integers(3, 8)))
            steps = rng.integers(-20, 21, size=(points_per_line, 2))  # (N, 2) pen moves in sensor units
            points = 1000 + np.cumsum(steps, axis=0)  # (N, 2)
            stroke = np.sort(rng.integers(0, max(1, points_per_line // 25), size=points_per_line))  # (N,)
            lines.append((text, points, np.unique(stroke, return_inverse=True)[1], None))
        forms.append(Form(form_id, f"{10000 + start // 16}", lines))
        splits[names[(len(forms) - 1) % len(names)]].append(form_id)
    return forms, splits


def forms_from_lines(lines):
    """Loaded InkLines back into (forms, splits) for write_iam_ondb; lines must be whole forms."""
    by_form, splits = {}, {split: [] for split in ih.IAM_SPLIT_FILES}
    for line in sorted(lines, key=lambda l: l.line_id):
        if line.form_id not in by_form:
            by_form[line.form_id] = Form(line.form_id, line.writer, [])
            splits[line.split].append(line.form_id)
        by_form[line.form_id].lines.append((line.text, line.points, line.stroke, line.times))
    return list(by_form.values()), splits


# ---------------------------------------------------------------------------
# Reading the real format
# ---------------------------------------------------------------------------


def test_reference_line_file_parses_to_points_strokes_times_and_corners():
    ink = ih.parse_line_strokes(REFERENCE_LINE.encode("iso-8859-1"), "a01-000u-01.xml")
    np.testing.assert_array_equal(ink.points, REFERENCE_POINTS)
    np.testing.assert_array_equal(ink.stroke, [0, 0, 0])
    np.testing.assert_array_equal(ink.times, REFERENCE_TIMES)
    assert ink.points.dtype == np.float64 and ink.points.shape == (3, 2)
    assert ink.corners == {"DiagonallyOppositeCoords": (6512.0, 1376.0),
                           "VerticallyOppositeCoords": (966.0, 1376.0),
                           "HorizontallyOppositeCoords": (6512.0, 787.0)}
    assert ink.sensor_corner == "top_left"


def test_empty_stroke_is_dropped_and_stroke_ids_stay_consecutive():
    ink = ih.parse_line_strokes(TWO_STROKE_LINE.encode(), "two.xml")
    np.testing.assert_array_equal(ink.points, TWO_STROKE_POINTS)
    np.testing.assert_array_equal(ink.stroke, [0, 0, 1])
    np.testing.assert_array_equal(ink.times, [770.01, 770.03, 770.25])
    assert list(ink.corners) == ["DiagonallyOppositeCoords"]


def test_hand_written_database_reads_back_text_ink_writer_and_split(tmp_path):
    lines_by_split, summary = ih.load_iam_ondb(write_reference_db(tmp_path), log=quiet)

    train = lines_by_split["train"]
    assert [l.line_id for l in train] == ["a01-000u-01", "a01-000u-02", "a01-000u-03"]
    assert [l.text for l in train] == ["A MOVE to stop Mr. Gaitskell", "from nominating any more",
                                       "Labour café Peers"]
    assert {(l.form_id, l.writer, l.split) for l in train} == {("a01-000u", "10020", "train")}
    np.testing.assert_array_equal(train[0].points, REFERENCE_POINTS)
    np.testing.assert_array_equal(train[0].times, REFERENCE_TIMES)
    np.testing.assert_array_equal(train[1].points, TWO_STROKE_POINTS)
    np.testing.assert_array_equal(train[1].stroke, [0, 0, 1])

    (val,), (val2,), (test,) = lines_by_split["validation"], lines_by_split["validation2"], lines_by_split["test"]
    assert (val.line_id, val.writer, val.text) == ("a01-000x-01", "10021", "A MOVE")
    assert (val2.line_id, val2.writer, val2.text, val2.split) == ("d04-081-01", "10158", "seen by", "validation2")
    assert (test.line_id, test.writer, test.text, test.split) == ("f07-088b-01", "f07-088b", "the end.", "test")

    assert summary["lines"] == {"train": 3, "validation": 1, "validation2": 1, "test": 1}
    assert summary["writer_from"] == {"original": 2, "forms.txt": 1, "unknown (form id used)": 1}
    assert summary["ignored"]["forms in no split file"] == 1
    assert summary["ignored"]["lines of forms in no split file"] == 1
    assert summary["skipped"] == {} and summary["lines_lost"] == 0


def test_summary_is_logged_with_lines_per_split(tmp_path):
    logged = []
    ih.load_iam_ondb(write_reference_db(tmp_path), log=logged.append)
    text = "\n".join(logged)
    assert "train" in text and "3 lines" in text and "validation2" in text
    assert "forms in no split file: 1" in text


def test_writer_id_comes_from_original_then_forms_txt_then_form_id(tmp_path):
    root = write_reference_db(tmp_path)
    # forms.txt disagrees with a01-000u's original file, and a01-000x's original is corrupt
    write_text(f"{root}/forms.txt", "a01-000u 99999\na01-000x 77777\nd04-081 10158\n")
    write_text(f"{root}/original/a01/a01-000/strokesx.xml", "<WhiteboardCaptureSession><General>")
    lines_by_split, summary = ih.load_iam_ondb(root, log=quiet)
    writers = {l.form_id: l.writer for lines in lines_by_split.values() for l in lines}
    assert writers == {"a01-000u": "10020", "a01-000x": "77777", "d04-081": "10158", "f07-088b": "f07-088b"}
    assert summary["writer_from"] == {"original": 1, "forms.txt": 2, "unknown (form id used)": 1}
    assert summary["ignored"]["invalid original files"] == 1


@pytest.mark.parametrize("text, expected", [
    (A01_000U_ASCII, ["A MOVE to stop Mr. Gaitskell", "from nominating any more", "Labour café Peers"]),
    ("OCR:\n\nx\n\nCSR:\n\none%%%%%%%%%%%two\n", ["one", "two"]),  # marker mid-line
    ("OCR:\r\n\r\nx\r\n\r\nCSR:\r\n\r\none\r\ntwo  \r\n", ["one", "two"]),  # CRLF
    ("CSR:\n\nwait\x85 no break\n", ["wait\x85 no break"]),  # latin-1 0x85 is not a line break
])
def test_parse_ascii_returns_the_csr_lines(text, expected):
    assert ih.parse_ascii(text, "x.txt") == expected


def test_parse_ascii_without_csr_section_raises_naming_the_file():
    with pytest.raises(IamOnDbError, match="a01-000u.txt"):
        ih.parse_ascii("OCR:\n\nsome prompt\n", "ascii/a01/a01-000/a01-000u.txt")


def test_split_entries_may_lack_the_copy_letter_and_bad_entries_raise():
    entries = " a01-020x\n d04-081\n\n f07-088b\n a01-020x\n"
    assert ih.parse_split_file(entries, "s") == ["a01-020x", "d04-081", "f07-088b"]
    with pytest.raises(IamOnDbError, match=r"trainset.txt line 2"):
        ih.parse_split_file(" a01-000u\n ../../etc/passwd\n", "trainset.txt")


def test_forms_txt_reads_first_two_columns_and_skips_comments():
    assert ih.parse_forms_txt("#--- header\n#\na01-000u 10020 extra\n\nd04-081\t10158\n") == {
        "a01-000u": "10020", "d04-081": "10158"}


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def test_writer_reproduces_the_reference_files_byte_for_byte(tmp_path):
    form = Form("a01-000u", "10020", [("A MOVE", REFERENCE_POINTS, [0, 0, 0], REFERENCE_TIMES)])
    ih.write_iam_ondb(tmp_path, [form], {"train": ["a01-000u"]})
    # The writer derives the corners from the ink's bounding box; the rest is the reference file.
    expected = (REFERENCE_LINE.replace('x="6512" y="1376"', 'x="1074" y="1110"')  # each pair is unique
                .replace('x="966" y="1376"', 'x="1072" y="1110"')
                .replace('x="6512" y="787"', 'x="1074" y="1058"'))
    assert (tmp_path / "lineStrokes/a01/a01-000/a01-000u-01.xml").read_text("iso-8859-1") == expected
    assert (tmp_path / "ascii/a01/a01-000/a01-000u.txt").read_text("iso-8859-1") == one_line_ascii("A MOVE")
    assert (tmp_path / "trainset.txt").read_text() == " a01-000u\n"
    assert (tmp_path / "testset_f.txt").read_text() == ""
    original = (tmp_path / "original/a01/a01-000/strokesu.xml").read_text("iso-8859-1")
    assert '<Form writerID="10020"/>' in original and '<TextLine id="a01-000u-01" text="A MOVE"/>' in original


def test_writer_marker_and_latin1_text_are_written_as_in_the_real_files(tmp_path):
    ink = (REFERENCE_POINTS, [0, 0, 0], None)
    form = Form("a01-000u", "1", [("Ça va", *ink), ("très bien", *ink)], marker_joins=(0,))
    ih.write_iam_ondb(tmp_path, [form], {})
    raw = (tmp_path / "ascii/a01/a01-000/a01-000u.txt").read_bytes()
    assert raw.endswith("CSR:\n\nÇa va%%%%%%%%%%%très bien\n".encode("iso-8859-1"))
    line = (tmp_path / "lineStrokes/a01/a01-000/a01-000u-02.xml").read_text("iso-8859-1")
    assert 'time="1.00"' not in line and 'start_time="2.04"' in line  # 20 ms clock, 1 s between lines


def test_original_file_holds_the_whole_forms_ink_with_each_lines_strokes_apart(tmp_path):
    ink = (REFERENCE_POINTS, [0, 0, 0], REFERENCE_TIMES)
    ih.write_iam_ondb(tmp_path, [Form("a01-000u", "10020", [("one", *ink), ("two", *ink)])], {})
    original = ih.parse_line_strokes((tmp_path / "original/a01/a01-000/strokesu.xml").read_bytes(), "strokesu.xml")
    np.testing.assert_array_equal(original.points, np.concatenate([REFERENCE_POINTS, REFERENCE_POINTS]))
    np.testing.assert_array_equal(original.stroke, [0, 0, 0, 1, 1, 1])  # one <Stroke> per line, not merged


def assert_same_lines(loaded, forms, splits):
    """Every line of `forms` is loaded once, in its split, with the same text, ink and writer."""
    by_id = {line.line_id: line for lines in loaded.values() for line in lines}
    split_of = {form_id: split for split, ids in splits.items() for form_id in ids}
    expected_ids = set()
    for form in forms:
        clock = 1.0
        for number, (text, points, stroke, times) in enumerate(form.lines, start=1):
            line = by_id[f"{form.form_id}-{number:02d}"]
            expected_ids.add(line.line_id)
            if times is None:  # the writer's 20 ms clock
                times = clock + 0.02 * np.arange(len(points))
            clock = times[-1] + 1.0
            assert (line.text, line.writer, line.form_id) == (text, form.writer, form.form_id)
            assert line.split == split_of[form.form_id]
            np.testing.assert_array_equal(line.points, points)
            np.testing.assert_array_equal(line.stroke, np.unique(stroke, return_inverse=True)[1])
            np.testing.assert_allclose(line.times, times, atol=0.005)  # written with two decimals
    assert set(by_id) == expected_ids


def test_write_then_load_returns_the_same_lines(tmp_path):
    forms, splits = random_forms(40, 60, seed=1)
    # explicit times off the 10 ms grid: they come back rounded to two decimals
    rng = np.random.default_rng(np.random.SeedSequence(7))
    first = forms[0]
    timed = [(text, points, stroke, 500.0 + 0.02 * np.arange(len(points)) + rng.uniform(-1e-3, 1e-3, len(points)))
             for text, points, stroke, _ in first.lines]
    forms[0] = Form(first.form_id, first.writer, timed)
    # ISO-8859-1 text and the %%% marker, in a form id without copy letter
    ink = [line[1:] for line in forms[1].lines[:2]]
    forms.append(Form("z09-123", "w-é", [("Ça va très bien", *ink[0]), ("deux", *ink[1])], marker_joins=(0,)))
    splits["train"].append("z09-123")
    ih.write_iam_ondb(tmp_path, forms, splits)
    loaded, summary = ih.load_iam_ondb(tmp_path, log=quiet)
    assert_same_lines(loaded, forms, splits)
    assert summary["skipped"] == {}


def test_loaded_lines_written_again_read_back_the_same(tmp_path):
    lines_by_split, _ = ih.load_iam_ondb(write_reference_db(tmp_path / "a"), log=quiet)
    forms, splits = forms_from_lines([l for lines in lines_by_split.values() for l in lines])
    ih.write_iam_ondb(tmp_path / "b", forms, splits)
    again, _ = ih.load_iam_ondb(tmp_path / "b", log=quiet)
    assert_same_lines(again, forms, splits)


def test_writer_can_put_writer_ids_in_forms_txt_instead_of_original_files(tmp_path):
    forms, splits = random_forms(32, 20, seed=3)
    ih.write_iam_ondb(tmp_path, forms, splits, write_original=False, write_forms_txt=True)
    assert not (tmp_path / "original").exists()
    loaded, summary = ih.load_iam_ondb(tmp_path, log=quiet)
    assert_same_lines(loaded, forms, splits)
    assert summary["writer_from"] == {"forms.txt": len(forms)}


@pytest.mark.parametrize("text", ["", " padded", "two\nlines", "has %%%%%%%%%%% marker", "日本"])
def test_writer_refuses_text_that_would_not_read_back(tmp_path, text):
    with pytest.raises(ValueError):
        ih.write_iam_ondb(tmp_path, [Form("a01-000u", "1", [(text, REFERENCE_POINTS, [0, 0, 0], None)])], {})


# ---------------------------------------------------------------------------
# Untrusted XML
# ---------------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<WhiteboardCaptureSession><StrokeSet><Stroke>
<Point x="1" y="2" time="&lol9;"/>
</Stroke></StrokeSet></WhiteboardCaptureSession>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE w [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<WhiteboardCaptureSession><StrokeSet><Stroke>
<Point x="1" y="2" time="3"/>&secret;
</Stroke></StrokeSet></WhiteboardCaptureSession>
"""

EXTERNAL_DTD = """<?xml version="1.0"?>
<!DOCTYPE WhiteboardCaptureSession SYSTEM "http://example.invalid/evil.dtd">
<WhiteboardCaptureSession><StrokeSet><Stroke><Point x="1" y="2" time="3"/></Stroke></StrokeSet></WhiteboardCaptureSession>
"""


@pytest.mark.parametrize("parse", [ih.parse_line_strokes, ih.parse_form_writer])
@pytest.mark.parametrize("document", [BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD])
def test_entities_and_external_dtds_are_refused_quickly(parse, document):
    start = time.perf_counter()
    with pytest.raises(IamOnDbError, match=r"evil\.xml.*refused") as caught:
        parse(document.encode(), "evil.xml")
    assert time.perf_counter() - start < 0.5  # refused at the declaration, never expanded
    assert "\n" not in str(caught.value)


def test_billion_laughs_line_file_is_skipped_by_the_loader(tmp_path):
    root = write_reference_db(tmp_path)
    write_text(f"{root}/lineStrokes/a01/a01-000/a01-000u-02.xml", BILLION_LAUGHS)
    lines_by_split, summary = ih.load_iam_ondb(root, log=quiet)
    assert [l.line_id for l in lines_by_split["train"]] == ["a01-000u-01", "a01-000u-03"]
    assert summary["skipped"] == {"invalid line files": 1}


@pytest.mark.parametrize("document, problem", [
    (REFERENCE_LINE.replace(' time="769.07"', ""), "without the 'time' attribute"),
    (REFERENCE_LINE.replace('x="1072"', 'x="ten"'), "non-numeric"),
    (REFERENCE_LINE.replace('x="1072"', 'x="nan"'), "non-finite"),
    (REFERENCE_LINE.replace('DiagonallyOppositeCoords x="6512"', "DiagonallyOppositeCoords"), "without x and y"),
    (REFERENCE_LINE.replace("WhiteboardCaptureSession", "Session"), "root element"),
    (REFERENCE_LINE.replace("<Stroke ", "<Strok ").replace("</Stroke>", "</Strok>"), "outside a <Stroke>"),
    (TWO_STROKE_LINE.split("<StrokeSet>")[0] + "</WhiteboardCaptureSession>", "no <Point>"),
    (REFERENCE_LINE[:200], "invalid XML"),
])
def test_malformed_line_file_raises_one_line_naming_the_file(document, problem):
    with pytest.raises(IamOnDbError) as caught:
        ih.parse_line_strokes(document.encode(), "lineStrokes/a01/a01-000/a01-000u-01.xml")
    message = str(caught.value)
    assert "a01-000u-01.xml" in message and problem in message and "\n" not in message


# ---------------------------------------------------------------------------
# Skips are counted, not fatal
# ---------------------------------------------------------------------------


def test_invalid_line_file_missing_ascii_and_count_mismatch_are_skipped_and_counted(tmp_path):
    forms, splits = random_forms(48, 30, seed=2)  # 6 forms of 8 lines
    ih.write_iam_ondb(tmp_path, forms, splits)
    invalid, no_ascii, mismatch = forms[0].form_id, forms[4].form_id, forms[5].form_id
    (tmp_path / f"lineStrokes/r00/r00-000/{invalid}-08.xml").write_text("<WhiteboardCaptureSession><StrokeSet>")
    (tmp_path / f"ascii/r00/r00-004/{no_ascii}.txt").unlink()
    with open(tmp_path / f"ascii/r00/r00-005/{mismatch}.txt", "a") as f:
        f.write("a ninth CSR line without a line file\n")

    lines_by_split, summary = ih.load_iam_ondb(tmp_path, log=quiet)
    assert summary["skipped"] == {"invalid line files": 1, "forms without an ascii file": 1,
                                  "forms whose CSR line count differs from their line files": 1}
    assert summary["lines_lost"] == 1 + 8 + 8
    assert sum(summary["lines"].values()) == 48 - 17
    loaded = {l.line_id for lines in lines_by_split.values() for l in lines}
    assert f"{invalid}-07" in loaded and f"{invalid}-08" not in loaded
    assert not any(i.startswith((no_ascii, mismatch)) for i in loaded)


# ---------------------------------------------------------------------------
# Errors: one line naming the path
# ---------------------------------------------------------------------------


def assert_one_line_error(data_dir, *expected_parts):
    with pytest.raises(IamOnDbError) as caught:
        ih.load_iam_ondb(data_dir, log=quiet)
    message = str(caught.value)
    assert "\n" not in message
    for part in expected_parts:
        assert str(part) in message, message
    return message


def test_missing_folder(tmp_path):
    assert_one_line_error(tmp_path / "nowhere", tmp_path / "nowhere", "not found")


def test_folder_without_linestrokes_or_ascii(tmp_path):
    assert_one_line_error(tmp_path, tmp_path, "lineStrokes/", "ascii/")


def test_parent_folder_passed_points_to_the_data(tmp_path):
    root = write_reference_db(tmp_path / "IAM-OnDB")
    assert_one_line_error(tmp_path, f"found lineStrokes/ and ascii/ in {root}")


def test_linestrokes_folder_itself_passed_points_to_its_parent(tmp_path):
    root = write_reference_db(tmp_path)
    assert_one_line_error(os.path.join(root, "lineStrokes"), "lineStrokes/ folder itself", f"pass its parent {root}")


REQUIRED_SPLIT_FILES = ["trainset.txt", "testset_v.txt", "testset_f.txt"]  # testset_t.txt is optional


def test_only_validation2_is_an_optional_split():
    assert [ih.IAM_SPLIT_FILES[s] for s in ("train", "validation", "test")] == REQUIRED_SPLIT_FILES
    assert ih.IAM_SPLIT_FILES["validation2"] == "testset_t.txt"


@pytest.mark.parametrize("name", REQUIRED_SPLIT_FILES)
def test_missing_split_file(tmp_path, name):
    root = write_reference_db(tmp_path)
    os.remove(os.path.join(root, name))
    assert_one_line_error(root, os.path.join(root, name), "missing split file")


@pytest.mark.parametrize("name", REQUIRED_SPLIT_FILES)
def test_empty_split_file(tmp_path, name):
    root = write_reference_db(tmp_path)
    write_text(os.path.join(root, name), "\n  \n")
    assert_one_line_error(root, os.path.join(root, name), "empty")


@pytest.mark.parametrize("contents", [None, "", "\n  \n"])
def test_missing_or_empty_validation2_loads_the_other_splits(tmp_path, contents):
    root = write_reference_db(tmp_path)
    os.remove(os.path.join(root, "testset_t.txt"))
    if contents is not None:
        write_text(os.path.join(root, "testset_t.txt"), contents)
    lines_by_split, summary = ih.load_iam_ondb(root, log=quiet)
    assert summary["lines"] == {"train": 3, "validation": 1, "test": 1}
    assert set(lines_by_split) == {"train", "validation", "test"}
    assert summary["ignored"]["forms in no split file"] == 2  # d04-081 now too


def test_split_whose_forms_have_no_loadable_line(tmp_path):
    root = write_reference_db(tmp_path)
    os.remove(f"{root}/ascii/d04/d04-081/d04-081.txt")
    assert_one_line_error(root, os.path.join(root, "testset_t.txt"), "none has a loadable line")


def test_form_in_two_splits(tmp_path):
    root = write_reference_db(tmp_path)
    write_text(f"{root}/testset_f.txt", " f07-088b\n a01-000u\n")
    assert_one_line_error(root, "testset_f.txt", "a01-000u", "trainset.txt")


@pytest.mark.parametrize("relative", ["lineStrokes/a01/a01-000/a01-000u-02.xml", "ascii/a01/a01-000/a01-000u.txt",
                                      "original/a01/a01-000/strokesu.xml", "trainset.txt", "lineStrokes/a01"])
def test_unreadable_file_or_folder(tmp_path, relative):
    root = write_reference_db(tmp_path)
    path = os.path.join(root, relative)
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 leaves the path readable")
        assert_one_line_error(root, path, "cannot read")
    finally:
        os.chmod(path, 0o755)


@pytest.mark.parametrize("relative", ["lineStrokes/a01/a01-000/a01-000u-02.xml", "ascii/a01/a01-000/a01-000u.txt",
                                      "original/a01/a01-000/strokesu.xml", "testset_v.txt", "forms.txt"])
def test_permission_error_is_one_line_naming_the_file(tmp_path, monkeypatch, relative):
    # chmod cannot make a file unreadable for root, so the denial is simulated at open().
    root = write_reference_db(tmp_path)
    denied = os.path.join(root, relative)

    def open_denying(path, *args, **kwargs):
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", path)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(ih, "open", open_denying, raising=False)
    assert_one_line_error(root, denied, "permission denied")


def test_data_errors_are_user_errors_shown_in_one_line(tmp_path):
    # the CLI prints a UserError as one line instead of a traceback
    assert issubclass(IamOnDbError, ih.UserError)
    with pytest.raises(ih.UserError, match="not found"):
        ih.load_iam_ondb(tmp_path / "nowhere", log=quiet)


# ---------------------------------------------------------------------------
# Exported synthetic lines read back through the loader and the preprocessing
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered_lines():
    """Six fixed test lines of the lines task, one per writer (te000..te005)."""
    samples = ih.line_eval_set("test", 1)[:6]
    assert len({s.writer for s in samples}) == 6
    return samples


def export_and_load(out_dir, samples_by_split):
    n = ih.export_iam_ondb(out_dir, samples_by_split, log=quiet)
    assert n == sum(len(s) for s in samples_by_split.values())
    return ih.load_iam_ondb(out_dir, log=quiet)


def test_exported_lines_read_back_with_their_texts_writers_splits_ink_and_times(tmp_path, rendered_lines):
    by_split = {"train": rendered_lines[:2], "validation": rendered_lines[2:4], "test": rendered_lines[4:]}
    lines_by_split, summary = export_and_load(tmp_path, by_split)

    assert set(lines_by_split) == {"train", "validation", "test"}  # no validation2 in an export
    assert summary["skipped"] == {} and summary["ignored"] == {}
    assert summary["writer_from"] == {"original": 6}
    for split, samples in by_split.items():
        loaded = lines_by_split[split]
        assert [(l.text, l.writer, l.split) for l in loaded] == [(s.text, s.writer, split) for s in samples]
        for line, sample in zip(loaded, samples):
            np.testing.assert_array_equal(line.points, ih.sensor_points(sample.xy))  # integer sensor units, y down
            np.testing.assert_array_equal(line.stroke, np.cumsum(sample.pen_up).astype(int) - 1)
            np.testing.assert_allclose(line.times, ih.pen_times(sample.xy, sample.pen_up, 1.0), atol=0.0051)
    # the ink really is y down: a rendered line's top (large y up) has the smallest sensor y
    sample, line = by_split["train"][0], lines_by_split["train"][0]
    assert line.points[np.argmax(sample.xy[:, 1]), 1] == line.points[:, 1].min()


def test_a_writers_lines_beyond_one_form_go_to_further_forms_in_order(tmp_path, rendered_lines, monkeypatch):
    monkeypatch.setattr(ih, "LINES_PER_FORM", 2)
    one_writer = [dataclasses.replace(s, writer="te000") for s in rendered_lines[:5]]
    lines_by_split, summary = export_and_load(
        tmp_path, {"train": one_writer, "validation": rendered_lines[5:6], "test": [dataclasses.replace(rendered_lines[0], writer="te999")]})
    train = lines_by_split["train"]
    assert [l.line_id for l in train] == ["te000-000-01", "te000-000-02", "te000-001-01", "te000-001-02",
                                          "te000-002-01"]
    assert [l.text for l in train] == [s.text for s in one_writer]
    assert {l.writer for l in train} == {"te000"} and summary["forms"]["train"] == 3


def test_a_writer_in_two_splits_is_refused_before_writing(tmp_path, rendered_lines):
    same = [dataclasses.replace(s, writer="te000") for s in rendered_lines[:3]]
    by_split = {"train": same[:1], "validation": same[1:2], "test": same[2:3]}
    with pytest.raises(ValueError, match="te000.*writer-disjoint"):  # IAM-OnDB-t1 splits are writer-disjoint
        ih.export_iam_ondb(tmp_path, by_split, log=quiet)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_preprocessed_export_is_evenly_resampled_and_gives_25_finite_features(tmp_path, rendered_lines):
    lines_by_split, _ = export_and_load(
        tmp_path, {"train": rendered_lines[:2], "validation": rendered_lines[2:3], "test": rendered_lines[3:4]})
    step = ih.IAM_SPACING
    for line in [l for lines in lines_by_split.values() for l in lines]:
        pre = ih.preprocess(line.points, line.stroke, line.times)
        on_gap = n_steps = 0
        for k in range(pre.stroke.max() + 1):
            p = pre.points[pre.stroke == k]  # (n, 2)
            chords = np.linalg.norm(np.diff(p, axis=0), axis=1)  # (n-1,)
            # A stroke of ink length L gets n = max(2, round(L/step) + 1) points L/(n-1) apart along
            # the ink; a chord is shorter only where it cuts a corner, so the longest chord is the gap.
            gap = chords.max()
            if len(p) >= 3:
                assert abs(gap - step) <= step / (2 * (len(p) - 1)) + 1e-12, (line.line_id, k, gap)
            else:
                assert gap < 1.5 * step
            on_gap += np.sum(np.isclose(chords, gap, rtol=1e-9, atol=0))
            n_steps += len(chords)
        assert on_gap >= 0.4 * n_steps  # most chords lie on one straight piece of the ink: exactly the gap
        assert len(pre.points) > len(line.points)  # ~0.5 corpus heights between pen samples, 0.15 after

        x25 = ih.features_graves25(pre)
        assert x25.shape == (len(pre.points), 25) == (len(pre.points), len(ih.GRAVES25_NAMES))
        assert np.all(np.isfinite(x25))
        np.testing.assert_array_equal(x25[:, 0], pre.pen_up)
        np.testing.assert_array_equal(x25[:, 4], pre.points[:, 1])


# ---------------------------------------------------------------------------
# The round trip through the command line: export the lines task, train on it
# ---------------------------------------------------------------------------


def run_cli(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "iam_handwriting.py"), *map(str, args)], cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_exported_lines_train_as_iam_ondb_through_the_command_line(tmp_path):
    """--task lines --export-iam-ondb, then --task iam-ondb --data-dir on it, graves25, at quick size."""
    folder, out = tmp_path / "db", tmp_path / "iam.json"
    r = run_cli("--task", "lines", "--quick", "--export-iam-ondb", folder)
    assert r.returncode == 0 and "train 160, validation 40, test 80" in r.stdout, r.stderr
    r = run_cli("--task", "iam-ondb", "--data-dir", folder, "--features", "graves25", "--quick", "--epochs", "1",
                "--quiet", "--save-json", out)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    run = json.loads(out.read_text())
    assert run["task"]["name"] == "iam-ondb" and run["config"]["features"] == "graves25"
    assert set(run["task"]["alphabet"]) <= set(ih.LINE_ALPHABET) and " " in run["task"]["alphabet"]
    assert len(run["history"]) == 1 and run["model_source"] == "trained"
    assert {s: run["final"][s]["cer"] for s in ("validation", "test")}.keys() == {"validation", "test"}
    assert all(0.0 <= run["final"][s]["cer"] <= 1.0 for s in ("validation", "test"))
    assert len(run["per_writer"]) == 60  # 20 validation + 40 test writers, as exported


def test_an_alphabet_that_cannot_spell_the_dictionary_is_refused_before_training(tmp_path, rendered_lines):
    ih.export_iam_ondb(tmp_path, {"train": rendered_lines[:1], "validation": rendered_lines[1:2],
                                  "test": rendered_lines[2:3]}, log=quiet)
    r = run_cli("--task", "iam-ondb", "--data-dir", tmp_path, "--decoder", "lm", "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "dictionary needs the letters" in lines[0], r.stderr
    assert "epoch" not in r.stdout


# Augmentation of the real ink (--augment)

@pytest.fixture(scope="module")
def augment_folder(tmp_path_factory, rendered_lines):
    folder = tmp_path_factory.mktemp("augment")
    ih.export_iam_ondb(folder, {"train": rendered_lines[:3], "validation": rendered_lines[3:4],
                                "test": rendered_lines[4:6]}, log=quiet)
    return folder


def test_distortion_of_strength_zero_changes_nothing_and_strength_two_keeps_x_monotone(augment_folder):
    line = ih.load_iam_ondb(augment_folder, log=quiet)[0]["train"][0]
    plain = ih.preprocess(line.points, line.stroke, line.times)
    zero = ih.preprocess(line.points, line.stroke, line.times,
                         distortion=ih.draw_distortion(np.random.default_rng(1), 0.0))
    assert np.array_equal(plain.points, zero.points) and np.array_equal(plain.speed, zero.speed)
    strong = ih.preprocess(line.points, line.stroke, line.times,
                           distortion=ih.draw_distortion(np.random.default_rng(1), 2.0))
    assert not np.array_equal(plain.points[:10], strong.points[:10])
    rng = np.random.default_rng(2)
    x = np.linspace(0, 40, 4001)[:, None] * np.array([[1.0, 0.0]])
    for _ in range(200):
        moved = ih.apply_distortion(x, ih.draw_distortion(rng, 2.0))
        assert (np.diff(moved[:, 0]) > 0).all()  # the warp never folds the ink back


def augmented_epochs(folder, augment, seed=0, epochs=2, parallel_map=ih.serial_map):
    cfg = ih.RunConfig(task="iam-ondb", data_dir=str(folder), features="graves25", augment=augment)
    data = ih.iam_ondb_data(cfg, ih.make_streams(seed), parallel_map, quiet)
    rng = np.random.default_rng(seed)
    return data, [data.training_samples(rng, parallel_map) for _ in range(epochs)]


def test_augmented_epochs_featurised_by_two_processes_equal_one_process(augment_folder):
    """Each line's distortion is drawn before the lines are dealt out, so the pool cannot change them."""
    _, serial = augmented_epochs(augment_folder, 1.0)
    pool = ih.Pool(2)
    try:
        _, pooled = augmented_epochs(augment_folder, 1.0, parallel_map=pool.map)
    finally:
        pool.close()
    for one, two in zip(serial, pooled):
        assert [s.labels for s in one] == [s.labels for s in two]
        assert all(np.array_equal(a.traj, b.traj) for a, b in zip(one, two))


def test_augmentation_draws_fresh_labelled_lines_each_epoch_and_repeats_with_the_seed(augment_folder):
    data, (first, second) = augmented_epochs(augment_folder, 1.0)
    clean, (held, _) = augmented_epochs(augment_folder, 0.0)
    assert not data.training_held and clean.training_held and data.epoch_size == clean.epoch_size == 3
    assert [s.labels for s in first] == [s.labels for s in held] and all(s.labels for s in first)
    assert all(not np.array_equal(a.traj, b.traj) for a, b in zip(first, second))
    assert all(not np.array_equal(a.traj, b.traj) for a, b in zip(first, held))
    assert np.array_equal(data.input_scale, clean.input_scale)  # normalised by the undistorted lines
    _, (again, _) = augmented_epochs(augment_folder, 1.0)
    assert all(np.array_equal(a.traj, b.traj) for a, b in zip(first, again))
    # Still the same ink: its length changes by little more than the resampling factor.
    assert all(0.6 < len(a.traj) / len(b.traj) < 1.6 for a, b in zip(first, held))
