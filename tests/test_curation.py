"""Concept-balanced curation (freeze-align §4.2): whole-word matching, concept files, the
rarest-first capped selection on a hand-made caption set, and the Ray Data job writing a
dataset that trains directly (same schema, eval/ and vocabulary carried over, counts beside it)."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytrain.config import DataConfig
from raytrain.data.curation import ConceptMatcher, CurationError, curate, default_concepts, load_concepts, select

CONCEPTS = ["red", "Blue", "circle", "traffic light", "square"]
CAPTIONS = {
    "r00": "a red circle",  # red, circle
    "r01": "A RED square",  # red, square
    "r02": "a reddish circle",  # circle ("reddish" is not "red")
    "r03": "a blue circle",  # blue, circle
    "r04": "traffic light, red",  # traffic light, red
    "r05": "two traffic lights",  # nothing ("lights" is not "light")
    "r06": "a bored square",  # square
    "r07": "blue-circle",  # blue, circle
    "r08": "a red circle",  # red, circle
    "r09": "nothing here",  # nothing
    "r10": "a Circle",  # circle
    "r11": "circle circle",  # circle (once)
    "r12": "",  # nothing
}
# By hand, cap 2. Rows per concept: traffic light 1, blue 2, square 2, red 4, circle 7, so the
# order is traffic light, blue, square (ties by name), red, circle:
#   traffic light takes r04; blue r03, r07; square r01, r06; red has r00, r08 left (r01, r04
#   taken) and takes both; circle has r02, r10, r11 left (r00, r03, r07, r08 taken) and takes
#   two of them, in the seeded order.
FIXED = {
    "r04": "traffic light",
    "r03": "Blue",
    "r07": "Blue",
    "r01": "square",
    "r06": "square",
    "r00": "red",
    "r08": "red",
}
CIRCLE_LEFT = {"r02", "r10", "r11"}
HAND_COUNTS = [  # (concept, before, selected, after), in the order of selection
    ("traffic light", 1, 1, 1),
    ("Blue", 2, 2, 2),
    ("square", 2, 2, 2),
    ("red", 4, 2, 4),
    ("circle", 7, 2, 6),
]


def matches():
    m = ConceptMatcher(CONCEPTS)
    return {i: m(c) for i, c in CAPTIONS.items() if m(c)}


def test_whole_word_case_insensitive_multi_word_matching():
    m = ConceptMatcher(["red", "traffic light", "t-shirt"])
    assert m("A RED T-Shirt") == [0, 2] and m("red t shirt") == [0, 2]
    assert m("a Traffic   light; red!") == [0, 1] and m("traffic-light") == [1]
    assert m("reddish traffic lights") == [] and m("a bored light") == [] and m(None) == [] and m("") == []
    assert len(matches()) == 10 and matches()["r11"] == [CONCEPTS.index("circle")]


def test_concept_files(tmp_path):
    (tmp_path / "c.txt").write_text("# colours\nred\n\n  traffic light  \n")
    assert load_concepts(tmp_path / "c.txt") == ["red", "traffic light"]
    (tmp_path / "c.yaml").write_text("- red\n- traffic light\n")
    assert load_concepts(tmp_path / "c.yaml") == ["red", "traffic light"]
    (tmp_path / "dup.txt").write_text("red\nRed\n")
    with pytest.raises(CurationError, match=r"dup.txt:2: 'Red' repeats the concept of .*dup.txt:1"):
        load_concepts(tmp_path / "dup.txt")
    (tmp_path / "bad.yaml").write_text("- red\n- 3\n")
    with pytest.raises(CurationError, match=r"bad.yaml: item 2: 3 is not a concept"):
        load_concepts(tmp_path / "bad.yaml")
    (tmp_path / "map.yaml").write_text("red: 1\n")
    with pytest.raises(CurationError, match="expected a YAML list"):
        load_concepts(tmp_path / "map.yaml")
    with pytest.raises(CurationError, match="does not exist"):
        load_concepts(tmp_path / "missing.txt")
    embedded = default_concepts(DataConfig())
    assert {"red", "circle", "striped", "grey", "red circle"} <= set(
        embedded
    ) and "red star" not in embedded  # held out
    with pytest.raises(CurationError, match="--concepts"):
        default_concepts(DataConfig(path="/data/x"))


def test_rarest_first_capped_selection_by_hand():
    taken, order = select(matches(), CONCEPTS, cap=2, seed=0)
    assert [CONCEPTS[c] for c in order] == ["traffic light", "Blue", "square", "red", "circle"]
    assert {r: CONCEPTS[c] for r, c in taken.items() if r in FIXED} == FIXED
    chosen = set(taken) - set(FIXED)
    assert len(chosen) == 2 and chosen <= CIRCLE_LEFT and all(CONCEPTS[taken[r]] == "circle" for r in chosen)
    assert select(matches(), CONCEPTS, cap=2, seed=0) == (taken, order)  # deterministic given the seed
    draws = {frozenset(set(select(matches(), CONCEPTS, 2, seed)[0]) - set(FIXED)) for seed in range(10)}
    assert len(draws) > 1 and all(len(d) == 2 and d <= CIRCLE_LEFT for d in draws)  # the seed picks among the rest
    everything, _ = select(matches(), CONCEPTS, cap=10, seed=0)
    assert set(everything) == set(matches())  # a cap that binds nowhere keeps every matching row
    with pytest.raises(CurationError, match="cap 0"):
        select(matches(), CONCEPTS, cap=0, seed=0)


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_curation_job_writes_a_trainable_dataset(tmp_path, ray_local, capsys):
    from raytrain.data.pipeline import prepare

    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "eval").mkdir()
    ids = list(CAPTIONS)
    schema = pa.schema(
        [("id", pa.string()), ("image", pa.binary()), ("caption", pa.string()), ("caption_short", pa.string())]
    )
    for f, part in enumerate((ids[:7], ids[7:])):
        rows = {
            "id": part,
            "image": [png(int(i[1:])) for i in part],
            "caption": [CAPTIONS[i] for i in part],
            "caption_short": [CAPTIONS[i][:5] for i in part],
        }
        pq.write_table(pa.table(rows, schema=schema), src / "train" / f"part-{f:05d}.parquet")
    (src / "eval" / "classes.json").write_text(json.dumps({"classes": ["red circle"]}))
    (src / "manifest.json").write_text(json.dumps({"vocabulary": ["a", "red", "circle", "zebra"]}))
    out = tmp_path / "curated"
    data = DataConfig(path=str(src))

    report = curate(data, str(out), CONCEPTS, cap=2, seed=0)
    taken, _ = select(matches(), CONCEPTS, cap=2, seed=0)
    written = pa.concat_tables([pq.read_table(p) for p in sorted((out / "train").glob("*.parquet"))])
    assert sorted(written.column("id").to_pylist()) == sorted(taken) and written.num_rows == 9
    for p in sorted((out / "train").glob("*.parquet")):
        assert pq.read_schema(p).remove_metadata() == schema, p
    row = written.to_pylist()[written.column("id").to_pylist().index("r04")]
    assert row == {"id": "r04", "image": png(4), "caption": CAPTIONS["r04"], "caption_short": CAPTIONS["r04"][:5]}
    assert [(r["concept"], r["before"], r["selected"], r["after"]) for r in report["concepts"]] == HAND_COUNTS
    assert (report["rows_before"], report["rows_matched"], report["rows_after"]) == (13, 10, 9)
    assert json.loads((out / "curation.json").read_text()) == report
    printed = capsys.readouterr().out
    assert "| circle        |      7 |        2 |     6 |" in printed and "curated 9 of 13 rows" in printed

    curated = prepare(DataConfig(path=str(out)))  # trains directly: data.path=<out>
    assert curated.num_rows == 9 and curated.vocabulary == ("a", "red", "circle", "zebra")
    assert json.loads((out / "eval" / "classes.json").read_text()) == {"classes": ["red circle"]}
    with pytest.raises(CurationError, match="already holds a dataset"):
        curate(data, str(out), CONCEPTS, cap=2, seed=0)
