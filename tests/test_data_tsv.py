"""TSVReader: column selection, OFA's slicing by rank, line numbers, bad rows."""
import pickle

import pytest

from helpers_data import write_tsv
from mue_fairseq.data import DataError, TSVReader
from mue_fairseq.data.tsv import slice_bounds


def _rows(n, cols=4):
    return [[f"r{i}c{j}" for j in range(cols)] for i in range(n)]


def test_selected_columns_in_given_order(tmp_path):
    path = write_tsv(tmp_path / "a.tsv", _rows(3))
    reader = TSVReader(path, "3,0,2")
    assert len(reader) == 3 and reader.get_total_row_count() == 3
    assert reader[1].values == ["r1c3", "r1c0", "r1c2"]
    assert reader[1].line == 2 and reader[-1].line == 3
    assert TSVReader(path)[0].values == ["r0c0", "r0c1", "r0c2", "r0c3"]  # all columns
    assert TSVReader(path, [1])[2].values == ["r2c1"]


def test_crlf_and_missing_final_newline(tmp_path):
    path = tmp_path / "b.tsv"
    path.write_bytes(b"a\tb\r\nc\td")
    reader = TSVReader(str(path), "0,1")
    assert [reader[i].values for i in range(len(reader))] == [["a", "b"], ["c", "d"]]


@pytest.mark.parametrize("total,world", [(10, 3), (7, 7), (2, 4), (9, 1)])
def test_slices_partition_rows_like_ofa(tmp_path, total, world):
    path = write_tsv(tmp_path / "c.tsv", _rows(total, 1))
    seen = []
    for rank in range(world):
        reader = TSVReader(path, "0", slice_id=rank, slice_count=world)
        seen += [reader[i].values[0] for i in range(len(reader))]
        # OFA: the first total % world slices hold one row more
        assert len(reader) == total // world + (rank < total % world)
    assert seen == [f"r{i}c0" for i in range(total)]


def test_slice_bounds():
    assert [slice_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]


def test_short_row_names_file_row_column(tmp_path):
    rows = _rows(3)
    rows[1] = rows[1][:2]
    path = write_tsv(tmp_path / "short.tsv", rows)
    reader = TSVReader(path, "0,3", fields=("id", "label"))
    assert reader[0].values == ["r0c0", "r0c3"]
    with pytest.raises(DataError) as err:
        reader[1]
    e = err.value
    assert (e.path, e.row, e.column, e.field) == (path, 2, 3, "label")
    assert "short.tsv" in str(e) and "row 2" in str(e) and "column 3" in str(e)


def test_wrong_number_of_selected_cols(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", _rows(1))
    with pytest.raises(ValueError, match="needed: id, image, caption"):
        TSVReader(path, "0,1", fields=("id", "image", "caption"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.tsv"):
        TSVReader(str(tmp_path / "nope.tsv"))


def test_pickles_for_dataloader_workers(tmp_path):
    path = write_tsv(tmp_path / "e.tsv", _rows(3))
    reader = TSVReader(path, "1")
    reader[0]
    clone = pickle.loads(pickle.dumps(reader))
    assert clone[2].values == ["r2c1"]
    err = pickle.loads(pickle.dumps(DataError("bad", path="x", row=3, column=1, field="f")))
    assert (err.row, err.column, err.field) == (3, 1, "f")
