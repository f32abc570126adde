"""Untrusted LeRobot folders and robomimic files: every crafted path, name, frame or link is one error line, under a memory cap."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from mixpolicy.datasets.lerobot_format import export_lerobot, import_lerobot
from mixpolicy.datasets.replay_buffer import ATTRS_KEY, ReplayBuffer
from mixpolicy.datasets.robomimic_format import import_robomimic
from mixpolicy.errors import UserError
from test_data_interop import write_lerobot_v30, write_robomimic
from test_data_layer import make_image_dataset

pa = pytest.importorskip("pyarrow", reason="the interop extra (pyarrow) is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="the interop extra (pyarrow) is not installed")
h5py = pytest.importorskip("h5py", reason="robomimic import needs h5py (interop extra)")
ROOT = Path(__file__).resolve().parents[1]


def edit_info(root: Path, **changes) -> Path:
    info = json.loads((root / "meta" / "info.json").read_text())
    info.update(changes)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return root


def one_line_refusal(fn, pattern: str, out: Path) -> str:
    with pytest.raises(UserError, match=pattern) as info:
        fn()
    assert "\n" not in str(info.value)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return str(info.value)


BAD_TEMPLATES = [
    ("/tmp/elsewhere/file-{file_index:03d}.parquet", "must be a relative path inside the dataset"),
    ("../outside/file-{file_index:03d}.parquet", "must be a relative path inside the dataset"),
    ("data/./file-{file_index:03d}.parquet", "must be a relative path inside the dataset"),
    ("data\\\\file-{file_index:03d}.parquet", "must be a relative path inside the dataset"),
    ("data/chunk-{chunk_index:0999999999d}/file.parquet", r"field \{chunk_index:0999999999d\} is not allowed"),
    ("data/{chunk_index.__class__}/file.parquet", "field .* is not allowed"),
    ("data/{chunk_index!r}/file.parquet", "field .* is not allowed"),
    ("data/{video_key}/file.parquet", r"field \{video_key\} is not allowed"),
    ("data/chunk-{chunk_index:03d}/file-{file_index:03d}.json", "must be a relative path inside the dataset"),
]


@pytest.mark.parametrize("template, pattern", BAD_TEMPLATES)
def test_info_templates_must_be_canonical(tmp_path, template, pattern):
    src = edit_info(write_lerobot_v30(tmp_path / "lr"), data_path=template)
    one_line_refusal(lambda: import_lerobot(src, tmp_path / "out.zarr", progress=False), pattern, tmp_path / "out.zarr")


def test_a_template_resolved_through_a_link_out_of_the_source_is_refused(tmp_path):
    src = write_lerobot_v30(tmp_path / "lr")
    os.replace(src / "data", tmp_path / "outside")
    (src / "data").symlink_to(tmp_path / "outside")
    one_line_refusal(lambda: import_lerobot(src, tmp_path / "out.zarr", progress=False), "outside the dataset", tmp_path / "out.zarr")


@pytest.mark.parametrize("name", ["../../evil", "observation.images/../x", "a/b", ".hidden", "observation..state", "cam\\x"])
def test_feature_names_that_are_paths_are_refused(tmp_path, name):
    src = write_lerobot_v30(tmp_path / "lr")
    info = json.loads((src / "meta" / "info.json").read_text())
    info["features"][name] = info["features"].pop("observation.state")
    (src / "meta" / "info.json").write_text(json.dumps(info))
    one_line_refusal(lambda: import_lerobot(src, tmp_path / "out.zarr", progress=False), "is not a plain name", tmp_path / "out.zarr")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a tiny (truncated) image stream."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def replace_images(src: Path, raw: bytes) -> Path:
    path = src / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    cells = pa.array([{"bytes": raw, "path": None}] * len(table), type=table.schema.field("observation.images.top").type)
    pq.write_table(table.set_column(table.schema.get_field_index("observation.images.top"), "observation.images.top", cells), path)
    return src


def test_frames_must_be_pngs_of_the_declared_size(tmp_path):
    from PIL import Image

    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(jpeg, format="JPEG")
    src = replace_images(write_lerobot_v30(tmp_path / "jpeg"), jpeg.getvalue())
    one_line_refusal(lambda: import_lerobot(src, tmp_path / "out.zarr", progress=False), "an image cell is not a PNG", tmp_path / "out.zarr")
    src = replace_images(write_lerobot_v30(tmp_path / "bomb"), png_header_only(20000, 20000))
    one_line_refusal(lambda: import_lerobot(src, tmp_path / "out.zarr", progress=False), "is 20000x20000 pixels, its feature says 6x6", tmp_path / "out.zarr")


def test_data_files_are_read_one_row_group_at_a_time(tmp_path):
    src = write_lerobot_v30(tmp_path / "lr", lengths=(4, 3, 5))
    path = src / "data" / "chunk-000" / "file-000.parquet"
    pq.write_table(pq.read_table(path), path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 6
    buf = import_lerobot(src, tmp_path / "out.zarr", progress=False)
    assert buf.episode_lengths.tolist() == [4, 3, 5]
    np.testing.assert_array_equal(buf.get_episode(2)["state"][:, 0], [200, 201, 202, 203, 204])
    one_line_refusal(
        lambda: import_lerobot(src, tmp_path / "small.zarr", progress=False, max_episode_bytes=100),
        r"episode 0: 4 frames of \d+ bytes exceed max_episode_bytes=100",
        tmp_path / "small.zarr",
    )


def test_export_writes_only_under_plain_names(tmp_path):
    store = make_image_dataset(tmp_path / "d.zarr", size=8)
    attrs = dict(store.root.attrs[ATTRS_KEY])
    attrs["original_keys"] = {"state": "../../escaped"}
    store.root.attrs[ATTRS_KEY] = attrs
    store.close()
    one_line_refusal(
        lambda: export_lerobot(ReplayBuffer.open(store.path), tmp_path / "lr", progress=False),
        r"feature name of key 'state' '\.\./\.\./escaped' is not a plain name",
        tmp_path / "lr",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr"]


# ---------------------------------------------------------------------- robomimic
def with_extra(path: Path, make) -> Path:
    with h5py.File(path, "a") as f:
        make(f, path.parent)
    return path


def external_link(f, folder):
    (folder / "secret.txt").write_text("not for the store")
    with h5py.File(folder / "other.h5", "w") as o:
        o.create_dataset("x", data=np.arange(3.0))
    f["data/demo_0/obs/stolen"] = h5py.ExternalLink(str(folder / "other.h5"), "/x")


def external_storage(f, folder):
    (folder / "secret.bin").write_bytes(np.arange(5 * 3, dtype=np.float64).tobytes())
    del f["data/demo_0/obs/robot0_eef_pos"]
    f["data/demo_0/obs"].create_dataset("robot0_eef_pos", shape=(5, 3), dtype="f8", external=[(str(folder / "secret.bin"), 0, 120)])


def virtual(f, folder):
    with h5py.File(folder / "other.h5", "w") as o:
        o.create_dataset("x", data=np.zeros((5, 3)))
    layout = h5py.VirtualLayout(shape=(5, 3), dtype="f8")
    layout[:] = h5py.VirtualSource(str(folder / "other.h5"), "x", shape=(5, 3))
    del f["data/demo_0/obs/robot0_eef_pos"]
    f["data/demo_0/obs"].create_virtual_dataset("robot0_eef_pos", layout)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (external_link, r"HDF5 /data/demo_0/obs/stolen is an external link to .*other.h5:/x"),
        (external_storage, r"HDF5 dataset /data/demo_0/obs/robot0_eef_pos is stored in the external file .*secret.bin"),
        (virtual, r"HDF5 dataset /data/demo_0/obs/robot0_eef_pos is virtual"),
    ],
)
def test_hdf5_links_external_storage_and_virtual_datasets_are_refused(tmp_path, make, pattern):
    src = with_extra(write_robomimic(tmp_path / "d.hdf5"), make)
    one_line_refusal(lambda: import_robomimic(src, tmp_path / "out.zarr", progress=False), pattern, tmp_path / "out.zarr")


def huge_demo(f, folder):
    del f["data/demo_1/actions"]
    f["data/demo_1"].create_dataset("actions", shape=(10**8, 7), dtype="f8", chunks=(1024, 7))  # 5.6 GB, never written
    del f["data/demo_1/obs/robot0_eef_pos"]
    f["data/demo_1/obs"].create_dataset("robot0_eef_pos", shape=(10**8, 3), dtype="f8", chunks=(1024, 3))
    del f["data/demo_1/obs/agentview_image"]
    f["data/demo_1/obs"].create_dataset("agentview_image", shape=(10**8, 8, 8, 3), dtype="u1", chunks=(64, 8, 8, 3))


MEMORY_CAPPED = textwrap.dedent(
    """
    import resource, sys
    from mixpolicy.datasets.lerobot_format import import_lerobot
    from mixpolicy.datasets.robomimic_format import import_robomimic
    from mixpolicy.errors import UserError

    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) << 10
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # 1 GiB more than the imports use
    for kind, src in zip(sys.argv[1::2], sys.argv[2::2]):
        try:
            (import_lerobot if kind == "lerobot" else import_robomimic)(src, src + ".zarr", progress=False)
        except UserError as exc:
            print(exc)
        else:
            print("imported")
    """
)


@pytest.mark.slow
def test_crafted_inputs_are_refused_under_a_memory_cap(tmp_path):
    bomb = replace_images(write_lerobot_v30(tmp_path / "bomb"), png_header_only(30000, 30000))
    long_episode = write_lerobot_v30(tmp_path / "long")
    table = pq.read_table(long_episode / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    lengths = pa.array([10**9, 3], pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("length"), "length", lengths), long_episode / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    traversal = edit_info(write_lerobot_v30(tmp_path / "dots"), data_path="../../../etc/file-{file_index:03d}.parquet")
    huge = with_extra(write_robomimic(tmp_path / "huge.hdf5"), huge_demo)
    link = with_extra(write_robomimic(tmp_path / "link.hdf5"), external_link)
    good = write_robomimic(tmp_path / "good.hdf5")
    args = ["lerobot", bomb, "lerobot", long_episode, "lerobot", traversal, "robomimic", huge, "robomimic", link, "robomimic", good]
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_CAPPED, *map(str, args)],
        # RLIMIT_AS counts address space: glibc's 64 MiB reservation per thread arena is not memory use, and
        # zarr's I/O threads would spend the cap on them (seen with Python 3.12, torch 2.7, zarr 3.4).
        env={**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2"}, capture_output=True, text=True, timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 6, proc.stderr[-2000:]
    assert "is 30000x30000 pixels, its feature says 6x6" in lines[0]
    assert lines[1] == "episode 0: length 1000000000 is not a whole number in [0, 1000000)"
    assert "must be a relative path inside the dataset" in lines[2]
    assert "demo demo_1 holds" in lines[3] and "over max_episode_bytes" in lines[3]
    assert "is an external link" in lines[4]
    assert lines[5] == "imported"  # the cap leaves room for a real import
