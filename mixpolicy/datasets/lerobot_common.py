"""What LeRobot import and export share: file layout, key names, and the checks that keep
every path derived from a dataset's metadata inside the dataset folder.

A LeRobot folder is untrusted input: ``meta/info.json`` supplies the path templates and
feature names that become file paths and store keys. Only the canonical template shape
is accepted (relative, no ``..``, fields ``chunk_index``/``file_index`` (+ ``video_key``),
in v2.1 ``episode_chunk``/``episode_index`` (+ ``video_key``),
with at most a small zero-padded width), feature names are plain (letters, digits,
``_ - .``, no ``..``), and each resolved path must lie inside the source folder.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from mixpolicy.datasets.store_meta import DatasetMeta
from mixpolicy.errors import UserError
from mixpolicy.keys import camera_key, camera_name, is_image_key

CODEBASE_VERSION = "v3.0"  # what export writes
V21 = "v2.1"  # one parquet file per episode, one mp4 per episode and camera, jsonl metadata
READ_VERSIONS = (CODEBASE_VERSION, V21)
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
CHUNKS_SIZE = 1000  # files per chunk folder, as lerobot
DATA_FILE_MB = 100
MAX_INDEX = 10**6  # chunk and file indices: far more files than any dataset has
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
TEMPLATE_LITERAL = re.compile(r"[A-Za-z0-9_.\-/]*")
TEMPLATE_SPEC = re.compile(r"(0[1-9])?d?")  # e.g. "03d"; widths up to 9
TEMPLATE_FIELDS = {"data_path": {"chunk_index", "file_index"}, "video_path": {"chunk_index", "file_index", "video_key"}}
TEMPLATE_FIELDS_V21 = {"data_path": {"episode_chunk", "episode_index"}, "video_path": {"episode_chunk", "episode_index", "video_key"}}
TEMPLATE_SUFFIX = {"data_path": ".parquet", "video_path": ".mp4"}


def require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"LeRobot import/export needs {module}: pip install 'mixpolicy[interop]'") from None


def to_store_key(name: str) -> str:
    if name.startswith("observation.images."):
        return camera_key(name[len("observation.images.") :].replace(".", "_"))
    if name.startswith("observation."):
        return name[len("observation.") :].replace(".", "_")
    return name.replace(".", "_")


def to_lerobot_name(key: str) -> str:
    if key == "action":
        return "action"
    if is_image_key(key):
        return "observation.images." + camera_name(key)
    return "observation." + key


def check_name(name: object, what: str) -> str:
    """``name`` when it is plain enough to be a file or store key name, else a UserError."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise UserError(f"{what} {name!r} is not a plain name (letters, digits, '_', '-', '.'; no '..' or '/')")
    return name


def check_template(template: object, field: str, source: Path, version: str = CODEBASE_VERSION) -> str:
    """``template`` when it has the canonical shape of info.json's ``field`` (in that dataset version), else a UserError."""
    allowed = (TEMPLATE_FIELDS_V21 if version == V21 else TEMPLATE_FIELDS)[field]
    where = f"{source / 'meta' / 'info.json'}: {field}"
    if not isinstance(template, str) or len(template) > 200:
        raise UserError(f"{where} must be a short path template string")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UserError(f"{where} {template!r} is not a valid template ({exc})") from None
    literal = "".join(p[0] for p in parts)
    segments = template.split("/")
    if (
        template.startswith("/")
        or "\\" in template
        or any(s in ("", ".", "..") for s in segments)
        or not TEMPLATE_LITERAL.fullmatch(literal)
        or not template.endswith(TEMPLATE_SUFFIX[field])
    ):
        raise UserError(f"{where} {template!r} must be a relative path inside the dataset (no leading '/', no '..', no backslash)")
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in allowed or conversion or not TEMPLATE_SPEC.fullmatch(spec or ""):
            raise UserError(
                f"{where} {template!r}: field {{{name}{':' + spec if spec else ''}}} is not allowed "
                f"(fields {sorted(allowed)}, widths like ':03d' up to 9)"
            )
    return template


def check_index(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_INDEX:
        raise UserError(f"{what} {value!r} is not a whole number in [0, {MAX_INDEX})")
    return value


def resolve_inside(source: Path, template: str, **fields) -> Path:
    """The file ``template`` names for ``fields``, which must lie inside ``source``."""
    path = (source / template.format(**fields)).resolve()
    if source.resolve() not in path.parents:
        raise UserError(f"{source}: {template!r} with {fields} leads to {path}, outside the dataset")
    return path


def imported_meta(info: dict, specs: dict, original: dict[str, str], version: str, src: Path, resize: tuple[int, int] | None = None) -> DatasetMeta:
    """The store metadata of a LeRobot import: its fps, features (``specs``, action last-named
    ``action``; camera shapes after any ``resize``), their original names and robot type, and
    where it came from."""
    from mixpolicy.datasets.resize import resize_note

    return DatasetMeta(
        fps=float(info["fps"]),
        obs_keys=[k for k in specs if k != "action"],
        action_key="action",
        source=f"lerobot {version}: {src.name}{resize_note(resize)}",
        specs=specs,
        original_keys=original,
        robot_type=str(info.get("robot_type") or ""),
    )
