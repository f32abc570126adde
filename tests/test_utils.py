import pytest

from mixpolicy.utils import staged_output


def test_staged_output_replaces_only_on_success(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(dst) as tmp:
            (tmp / "new.txt").parent.mkdir(parents=True)
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial left behind
    assert (dst / "old.txt").read_text() == "old"
    with staged_output(dst) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
