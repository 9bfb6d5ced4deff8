"""Ingestion without Ray (docs/data-contracts.md#frames): list sources, decode videos and images, map Parquet columns.

A source (one entry of ``cfg.sources``, a local path or ``s3://`` URI) is one of

* a video file (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ``.webm``, ...): one video, ``video_id`` = file stem;
* a folder of videos: ``<root>/<video>.mp4`` (with ``category_from_folder``: ``<root>/<category>/<video>.mp4``);
* a folder of images: ``<root>/<video>/<frame>.png|jpg|jpeg`` (with ``category_from_folder``:
  ``<root>/<category>/<video>/<frame>``); ``video_id`` = the video folder's name; each folder is treated
  as a video (``frame_stride`` and ``max_frames`` apply to it);
* a Parquet file or a folder of Parquet parts: an existing frame table, columns renamed by ``column_map``,
  taken as it is (rows in file order, parts in natural order; images neither decoded nor resized).

Files of other types and hidden files in folders are ignored (and counted in the log).

With ``ingest.motion_crop`` (still-camera videos), every frame also gets a ``bbox`` around what moves in its
video (``motion_crop.py``); a video's frames must then all be in one unit (a video file and an image folder
always are; a Parquet part must hold whole videos).

Planning turns the sources into *units* of work (one video file, one image folder, one Parquet part), each a
JSON-able dict, numbered in the stable order that fixes ``frame_id``: source position in ``cfg.sources``, then
the natural order of the unit's relative path inside its source, then ``frame_index`` (Parquet: row order).
``ingest_unit`` decodes one unit into a staging Parquet file and returns a small summary (row count, keys,
skipped frames, or the error message); ``finalize_part`` adds the global ``frame_id`` once the offsets are known.
The Ray layer (``stages/ingest.py``) only fans these two functions out.

``frame_index`` is the frame's *original* position in its video: the decode (presentation) order of the
video's frames before ``frame_stride`` / ``max_frames``, or the position of the image file in the natural
order of its folder. Strided or skipped frames leave gaps, so ``frame_index`` differences stay temporal
distances (Local Temporal Pooling, Eq. 9, relies on that).
"""
from __future__ import annotations

import io
import itertools
import logging
import os
import posixpath
import re
import stat
import warnings
from typing import Any, Callable, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from . import schema, storage
from .config import IngestConfig

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ogv", ".3gp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PARQUET_SUFFIXES = (".parquet", ".pq")
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}
JPEG_QUALITY = 95  # near-lossless; only used when image_format is jpeg

# The frame table without frame_id: what one unit yields before global ids are assigned.
UNIT_SCHEMA = pa.schema([f for f in schema.FRAMES if f.name != schema.FRAME_ID])
CANONICAL = tuple(f.name for f in schema.FRAMES)
OPTIONAL = (schema.IMAGE, schema.URI, schema.BBOX)


class IngestError(ValueError):
    """A source cannot be ingested; the message names the file / column / frame."""


def raise_all(errors: list[str]) -> None:
    """One IngestError naming every failed input (none: nothing raised), so one run shows the user all of them."""
    if len(errors) == 1:
        raise IngestError(errors[0])
    if errors:
        raise IngestError(f"{len(errors)} inputs cannot be ingested:\n" + "\n".join(f"- {e}" for e in errors))


# ---------------------------------------------------------------------------------------------
# Natural order


_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``f2`` < ``f10``; case-insensitive, ties by the text.

    ``re.split`` with a capturing group alternates text and digit runs (text first, maybe empty), so
    position i holds a str for even i and an int for odd i, and keys always compare.
    """
    parts = _DIGITS.split(text)
    key = tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))
    return (key, text)


def natural_sort(items: Iterable[Any], key: Optional[Callable[[Any], str]] = None) -> list:
    key = key or (lambda x: x)
    return sorted(items, key=lambda item: natural_key(key(item)))


# ---------------------------------------------------------------------------------------------
# Config and planning


def check_config(cfg: IngestConfig) -> None:
    """Reject settings that cannot work, naming the key, before any work starts."""
    if cfg.frame_stride < 1:
        raise IngestError(f"ingest.frame_stride must be >= 1, got {cfg.frame_stride}")
    if cfg.max_frames < 0:
        raise IngestError(f"ingest.max_frames must be >= 0 (0 = no limit), got {cfg.max_frames}")
    if cfg.resize_to < 0:
        raise IngestError(f"ingest.resize_to must be >= 0 (0 = keep size), got {cfg.resize_to}")
    if cfg.image_format.lower() not in IMAGE_FORMATS:
        raise IngestError(f"ingest.image_format must be one of {sorted(IMAGE_FORMATS)}, got {cfg.image_format!r}")
    if cfg.on_bad_frame not in ("error", "skip"):
        raise IngestError(f"ingest.on_bad_frame must be 'error' or 'skip', got {cfg.on_bad_frame!r}")
    for src, dst in cfg.column_map.items():
        if dst not in CANONICAL or dst == schema.FRAME_ID:
            raise IngestError(
                f"ingest.column_map maps '{src}' to '{dst}', which is not a frames column "
                f"(allowed: {', '.join(c for c in CANONICAL if c != schema.FRAME_ID)})"
            )
    targets = list(cfg.column_map.values())
    dup = sorted({t for t in targets if targets.count(t) > 1})
    if dup:
        raise IngestError(f"ingest.column_map maps several columns to '{dup[0]}'")


def _kind_of(path: str) -> Optional[str]:
    lower = path.lower()
    if lower.endswith(VIDEO_SUFFIXES):
        return "video"
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path.replace("\\", "/")))[0]


def plan_source(source: str, position: int, cfg: IngestConfig) -> list[dict]:
    """The units of one source, in natural order. Raises IngestError / StorageError naming the source
    when it is missing, unreachable, empty or laid out unlike any supported form."""
    uri = storage.absolute_uri(source)
    if not storage.exists(uri):  # StorageError "cannot reach <uri>" when an S3 endpoint is down
        raise IngestError(f"input not found: {source}")
    base = {"source": source, "source_pos": position}
    if not storage.is_dir(uri):
        kind = _kind_of(uri)
        if kind == "video":
            return [{**base, "kind": "video", "uri": uri, "video_id": _stem(uri), "category": cfg.default_category}]
        if kind == "parquet":
            return [{**base, "kind": "parquet", "uri": uri, "folder": posixpath.dirname(uri)}]
        raise IngestError(
            f"unsupported source {source}: expected a video file ({', '.join(VIDEO_SUFFIXES)}), "
            f"a folder of videos or images, or a Parquet file/folder"
        )

    root = storage.resolve(uri)[1]
    by_kind: dict[str, list[tuple[tuple[str, ...], str]]] = {"video": [], "image": [], "parquet": []}
    ignored = []
    for file_uri in storage.list_files(uri):
        rel = storage.resolve(file_uri)[1][len(root) + 1 :]
        parts = tuple(rel.split("/"))
        kind = _kind_of(rel)
        if kind is None or any(p.startswith(".") for p in parts):
            ignored.append(rel)  # _SUCCESS.json, .DS_Store, README.txt, hidden folders: not frames
            continue
        by_kind[kind].append((parts, file_uri))
    if ignored:
        log.info("ingest: %s: ignoring %d non-frame files (e.g. %s)", source, len(ignored), ignored[0])
    present = [k for k, v in by_kind.items() if v]
    if not present:
        raise IngestError(f"empty folder {source}: no video ({'/'.join(VIDEO_SUFFIXES)}), image "
                          f"({'/'.join(IMAGE_SUFFIXES)}) or Parquet files in it")
    if len(present) > 1:
        examples = ", ".join(f"{'/'.join(by_kind[k][0][0])} ({k})" for k in present)
        raise IngestError(f"folder {source} mixes kinds of input ({examples}); give each kind as its own source")
    kind = present[0]
    files = by_kind[kind]

    if kind == "parquet":
        ordered = natural_sort(files, key=lambda pf: "/".join(pf[0]))
        return [{**base, "kind": "parquet", "uri": f, "folder": uri} for _, f in ordered]

    cat_depth = 1 if cfg.category_from_folder else 0
    depth = cat_depth + (1 if kind == "video" else 2)
    layout = ("<category>/" if cfg.category_from_folder else "") + (
        "<video>.mp4" if kind == "video" else "<video>/<frame>.png"
    )
    for parts, _ in files:
        if len(parts) != depth:
            raise IngestError(
                f"folder {source}: file {'/'.join(parts)} is not laid out as {source}/{layout}"
                + ("" if cfg.category_from_folder or len(parts) != depth + 1 else
                   " (set ingest.category_from_folder=true for a category level)")
            )
    if kind == "video":
        units = []
        for parts, f in natural_sort(files, key=lambda pf: "/".join(pf[0])):
            category = parts[0] if cfg.category_from_folder else cfg.default_category
            units.append({**base, "kind": "video", "uri": f, "video_id": _stem(parts[-1]), "category": category})
        return units
    groups: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for parts, f in files:
        groups.setdefault(parts[:-1], []).append((parts[-1], f))
    units = []
    for group in natural_sort(groups, key="/".join):
        frames = natural_sort(groups[group], key=lambda nf: nf[0])
        category = group[0] if cfg.category_from_folder else cfg.default_category
        units.append({**base, "kind": "images", "files": [f for _, f in frames], "video_id": group[-1],
                      "category": category})
    return units


def plan_sources(sources: Iterable[str], cfg: IngestConfig) -> list[dict]:
    """All units of all sources, numbered ``unit`` = 0, 1, ... in frame_id order."""
    sources = list(sources)
    if not sources:
        raise IngestError("no sources to ingest: give video files, folders or Parquet paths/URIs")
    seen = set()
    for s in sources:
        if s in seen:
            raise IngestError(f"source {s} is listed twice")
        seen.add(s)
    units, errors = [], []
    for pos, s in enumerate(sources):
        try:
            units += plan_source(s, pos, cfg)
        except IngestError as exc:  # every missing or malformed source is named, not the first only
            errors.append(str(exc))
    raise_all(errors)
    for i, unit in enumerate(units):
        unit["unit"] = i
    return units


# ---------------------------------------------------------------------------------------------
# Decoding


def shrink(image: Image.Image, resize_to: int) -> Image.Image:
    """Shrink so the longer side is ``resize_to`` pixels (never enlarges; 0 = unchanged)."""
    w, h = image.size
    if not resize_to or max(w, h) <= resize_to:
        return image
    scale = resize_to / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)  # PIL filters with a support scaled to the shrink


def encode_image(image: Image.Image, image_format: str) -> bytes:
    fmt = IMAGE_FORMATS[image_format.lower()]
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def decode_video(uri: str, cfg: IngestConfig, video_id: str = "") -> tuple[list[int], list[bytes], list[dict]]:
    """Decode one video with PyAV (bundled FFmpeg). Returns (frame_index list, encoded images, skipped).

    Keeps decode indices 0, stride, 2·stride, ... (at most ``max_frames`` of them), each shrunk to
    ``resize_to`` and encoded as ``image_format``. S3 videos are read through ``storage`` and decoded from
    memory. A video that cannot be opened or yields no frame is an IngestError whatever ``on_bad_frame``
    says; a packet that fails to decode is an error, or with ``on_bad_frame="skip"`` listed in ``skipped``
    (its frame_index counts one frame per failed packet, the usual one-frame-per-packet case).
    """
    import av  # PyAV bundles FFmpeg: no system ffmpeg needed (never skvideo.io)

    video_id = video_id or _stem(uri)
    handle: Any = io.BytesIO(storage.read_bytes(uri)) if storage.is_s3(uri) else uri
    indices: list[int] = []
    images: list[bytes] = []
    skipped: list[dict] = []
    try:
        container = av.open(handle, mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise IngestError(f"cannot decode video {uri}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise IngestError(f"cannot decode video {uri}: it has no video stream")
        stream = container.streams.video[0]
        index = 0  # decode (presentation) order of every frame, kept or not
        done = False
        try:
            packets = container.demux(stream)
            for packet in packets:
                try:
                    frames = packet.decode()
                except (av.error.FFmpegError, ValueError) as exc:
                    if cfg.on_bad_frame != "skip":
                        raise IngestError(f"cannot decode frame {index} of video {uri}: {exc}") from exc
                    skipped.append({"video_id": video_id, "frame_index": index, "reason": f"undecodable: {exc}"})
                    index += 1
                    continue
                for frame in frames:
                    if index % cfg.frame_stride == 0:
                        image = shrink(frame.to_image(), cfg.resize_to)
                        indices.append(index)
                        images.append(encode_image(image, cfg.image_format))
                        if cfg.max_frames and len(indices) >= cfg.max_frames:
                            done = True
                            break
                    index += 1
                if done:
                    break
        except (av.error.FFmpegError, OSError) as exc:  # demuxing failed: a truncated or corrupt file
            raise IngestError(f"cannot decode video {uri} after frame {index}: {exc}") from exc
        # A cut file demuxes without an error up to where it ends; only the count its index declares shows it.
        declared = stream.frames
        if not done and declared and index < declared:
            reason = f"truncated: decoded {index} of the {declared} frames its container declares"
            if cfg.on_bad_frame != "skip":
                raise IngestError(f"video {uri} is {reason}")
            skipped.append({"video_id": video_id, "frame_index": index, "reason": reason})
    if not indices and not skipped:
        raise IngestError(f"cannot decode video {uri}: no frames decoded")
    return indices, images, skipped


def open_image(data: bytes) -> tuple[Optional[Image.Image], str]:
    """Decode image bytes: (image, "") or (None, why not). More pixels than PIL's ``MAX_IMAGE_PIXELS`` (the
    limit every later decode enforces) are refused from the header, before they are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the numbers
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            limit = Image.MAX_IMAGE_PIXELS
            return None, f"{width}×{height} pixels, over the limit of {limit} (PIL's MAX_IMAGE_PIXELS)"
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"undecodable image: {exc}"
    return image, ""


def uri_roots(source_folder: str, extra: Iterable[str] = ()) -> list[str]:
    """Where a Parquet source's ``uri`` column may point: below the source's own folder (on S3: its bucket)
    and below the roots the config lists. Local roots with symlinks resolved, as the files will be."""
    roots = []
    for root in (source_folder, *extra):
        if storage.is_s3(root):
            roots.append("s3://" + (root[len("s3://"):].split("/", 1)[0] if root == source_folder else
                                    root[len("s3://"):].rstrip("/")))
        else:
            roots.append(os.path.realpath(root))
    return roots


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def uri_problem(uri: Any, roots: list[str]) -> str:
    """Why a frame's ``uri`` must not be read ("" when it may): a path outside ``roots`` (``/etc/...``, a
    symlink out of them, another bucket), a ``..`` component, or a local file that is not a regular file
    (a FIFO would block the reader, a device never end)."""
    if not isinstance(uri, str) or not uri:
        return "is empty"
    if ".." in uri.replace("\\", "/").split("/"):
        return "has a '..' component"
    outside = f"is outside the allowed roots ({', '.join(roots)}; add one with ingest.uri_roots)"
    if storage.is_s3(uri):
        return "" if any(_below(uri, r) for r in roots if storage.is_s3(r)) else outside
    if "://" in uri or not os.path.isabs(uri):
        return outside if "://" in uri else "is not an absolute path or an s3:// URI"
    real = os.path.realpath(uri)
    if not any(_below(real, r) for r in roots if not storage.is_s3(r)):
        return outside
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    return "" if stat.S_ISREG(mode) else "is not a regular file (a FIFO, device or folder)"


MAX_LISTED = 20  # bad rows named per table; the count says how many more


def check_rows(table: pa.Table, unit: dict, cfg: IngestConfig) -> tuple[pa.Table, list[dict]]:
    """Every row's image decodes within the pixel limit and its uri lies below the allowed roots, checked now
    rather than as a traceback in the features stage. Returns (table without skipped rows, skipped); an
    undecodable image is skipped under ``on_bad_frame="skip"``, a uri outside the roots is always an error.
    Raises IngestError naming the table and each bad row (video_id, frame_index)."""
    names = table.column_names
    images = table.column(schema.IMAGE).to_pylist() if schema.IMAGE in names else [None] * table.num_rows
    uris = table.column(schema.URI).to_pylist() if schema.URI in names else [None] * table.num_rows
    vids, idx = table.column(schema.VIDEO_ID).to_pylist(), table.column(schema.FRAME_INDEX).to_pylist()
    roots = uri_roots(unit["folder"], cfg.uri_roots) if schema.URI in names else []
    errors, skipped, keep = [], [], np.ones(table.num_rows, dtype=bool)
    for row, (data, uri) in enumerate(zip(images, uris)):
        where = f"row {row} (video_id {vids[row]!r}, frame_index {idx[row]})"
        problem = uri_problem(uri, roots) if uri is not None else ""
        if problem:
            errors.append(f"{where}: uri {uri!r} {problem}")
        problem = open_image(data)[1] if data is not None else ""
        if problem and cfg.on_bad_frame == "skip":
            skipped.append({"video_id": vids[row], "frame_index": idx[row], "file": unit["uri"],
                            "reason": f"row {row}: {problem}"})
            keep[row] = False
        elif problem:
            errors.append(f"{where}: {problem}")
    if errors:
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise IngestError(f"frames table ({unit['uri']}): {len(errors)} bad rows:\n  "
                          + "\n  ".join(errors[:MAX_LISTED]) + more)
    return (table.filter(pa.array(keep)) if skipped else table), skipped


def load_images(files: list[str], cfg: IngestConfig, video_id: str) -> tuple[list[int], list[bytes], list[dict]]:
    """Read one image folder's files (already in natural order). Returns (frame_index, images, skipped).

    The folder is a video: positions 0, stride, 2·stride, ... are kept, at most ``max_frames`` of them.
    Every kept image is decoded once to prove it is an image. Without ``resize_to`` the original bytes are
    kept (no re-encoding loss); with it, images larger than ``resize_to`` are shrunk and re-encoded as
    ``image_format``. An undecodable image is an IngestError naming the file, or skipped and listed.
    """
    indices, images, skipped = [], [], []
    for position, uri in enumerate(files):
        if position % cfg.frame_stride:
            continue
        if cfg.max_frames and len(indices) >= cfg.max_frames:
            break
        data = storage.read_bytes(uri)  # a missing file is a StorageError, not a bad frame
        image, problem = open_image(data)
        if problem:
            if cfg.on_bad_frame != "skip":
                raise IngestError(f"{uri}: {problem}")
            skipped.append({"video_id": video_id, "frame_index": position, "file": uri, "reason": problem})
            continue
        if cfg.resize_to and max(image.size) > cfg.resize_to:
            data = encode_image(shrink(image, cfg.resize_to), cfg.image_format)
        indices.append(position)
        images.append(data)
    return indices, images, skipped


def map_columns(table: pa.Table, column_map: dict, default_category: str, source: str) -> pa.Table:
    """Rename ``column_map``'s source columns to canonical ones, add ``category`` when absent, drop
    ``frame_id`` (ingest assigns its own) and other columns, and check types (cast where lossless).

    Returns a table with UNIT_SCHEMA's columns (optional ones only when present), rows in source order.
    """
    names = table.column_names
    for src in column_map:
        if src not in names:
            raise IngestError(
                f"{source}: ingest.column_map names column '{src}', which is not in it (has: {', '.join(names)})"
            )
    for src, dst in column_map.items():
        if dst in names and dst not in column_map:
            raise IngestError(
                f"{source}: ingest.column_map renames '{src}' to '{dst}', but the table already has a '{dst}' column"
            )
    table = table.rename_columns([column_map.get(n, n) for n in names])
    if schema.CATEGORY not in table.column_names:
        table = table.append_column(schema.CATEGORY, pa.array([default_category] * table.num_rows, pa.string()))
    hint = "; rename source columns with ingest.column_map" if not column_map else ""
    try:
        table = schema.check_columns(table, UNIT_SCHEMA, "frames", source, optional=OPTIONAL)
    except schema.SchemaError as exc:
        raise IngestError(f"{exc}{hint if 'missing' in str(exc) else ''}") from exc
    if schema.IMAGE not in table.column_names and schema.URI not in table.column_names:
        raise IngestError(
            f"frames table ({source}): needs an '{schema.IMAGE}' (bytes) or a '{schema.URI}' column "
            f"(has: {', '.join(names)}){hint}"
        )
    empty = np.ones(table.num_rows, dtype=bool)
    for col in (schema.IMAGE, schema.URI):
        if col in table.column_names:
            empty &= np.asarray(table.column(col).is_null())
    if empty.any():
        raise IngestError(f"frames table ({source}): row {int(np.flatnonzero(empty)[0])} has neither image nor uri")
    return table


def check_unit_duplicates(table: pa.Table, source: str) -> None:
    """(video_id, frame_index) must be unique; name the first duplicated pair and its rows."""
    if table.num_rows < 2:
        return
    vids = table.column(schema.VIDEO_ID).to_numpy(zero_copy_only=False).astype(object)
    idx = table.column(schema.FRAME_INDEX).to_numpy()
    order = np.lexsort((idx, vids.astype(str)))
    same = (vids[order][1:] == vids[order][:-1]) & (idx[order][1:] == idx[order][:-1])
    if same.any():
        first = int(np.flatnonzero(same)[0])
        video, index = vids[order][first], int(idx[order][first])
        rows = sorted(np.flatnonzero((vids == video) & (idx == index)).tolist())
        raise IngestError(
            f"frames table ({source}): duplicate (video_id, frame_index) = ({video!r}, {index}) at rows "
            f"{rows[0]} and {rows[1]}" + (f" ({same.sum()} duplicated pairs in all)" if same.sum() > 1 else "")
        )


def decode_unit(unit: dict, cfg: IngestConfig) -> tuple[pa.Table, list[dict]]:
    """One unit → (table with UNIT_SCHEMA's columns, skipped frames with their source); with
    ``cfg.motion_crop``, each frame's bbox from its video's motion."""
    table, skipped = _decode_unit(unit, cfg)
    if cfg.motion_crop and table.num_rows:
        table = with_motion_boxes(table, cfg.motion_threshold, unit.get("uri") or unit["source"])
    return table, skipped


def with_motion_boxes(table: pa.Table, threshold: float, where: str) -> pa.Table:
    """``table`` with a bbox column: each video's frames (all in this table) → ``motion_crop.motion_boxes``."""
    from .motion_crop import motion_boxes

    if schema.BBOX in table.column_names:
        raise IngestError(f"{where}: ingest.motion_crop would replace the frames' own '{schema.BBOX}' column; "
                          "set ingest.motion_crop=false to keep it")
    if schema.IMAGE not in table.column_names:
        raise IngestError(f"{where}: ingest.motion_crop needs the frames' pixels in an '{schema.IMAGE}' column")
    videos = table.column(schema.VIDEO_ID).to_numpy(zero_copy_only=False)
    order = np.lexsort((table.column(schema.FRAME_INDEX).to_numpy(), videos))
    images = table.column(schema.IMAGE).to_pylist()
    boxes = np.zeros((table.num_rows, 4), np.float32)
    starts = np.r_[0, np.flatnonzero(videos[order][1:] != videos[order][:-1]) + 1, len(order)]
    for lo, hi in itertools.pairwise(starts):
        rows = order[lo:hi]
        frames = [np.asarray(Image.open(io.BytesIO(images[r])).convert("L")) for r in rows]
        if len({f.shape for f in frames}) > 1:
            raise IngestError(f"{where}: video {videos[rows[0]]!r} has frames of different sizes "
                              f"({sorted({f.shape[::-1] for f in frames})}); ingest.motion_crop needs one size")
        boxes[rows] = motion_boxes(np.stack(frames), threshold)
    bbox = pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1), pa.float32()), 4)
    return table.append_column(UNIT_SCHEMA.field(schema.BBOX), bbox.cast(UNIT_SCHEMA.field(schema.BBOX).type))


def _decode_unit(unit: dict, cfg: IngestConfig) -> tuple[pa.Table, list[dict]]:
    kind = unit["kind"]
    if kind == "parquet":
        table = map_columns(storage.read_parquet(unit["uri"]), cfg.column_map, cfg.default_category, unit["uri"])
        check_unit_duplicates(table, unit["uri"])
        table, skipped = check_rows(table, unit, cfg)
        return table, [{"source": unit["source"], **s} for s in skipped]
    if kind == "video":
        indices, images, skipped = decode_video(unit["uri"], cfg, unit["video_id"])
        where = unit["uri"]
    elif kind == "images":
        indices, images, skipped = load_images(unit["files"], cfg, unit["video_id"])
        where = posixpath.dirname(unit["files"][0]) if unit["files"] else unit["source"]
    else:
        raise IngestError(f"unknown unit kind {kind!r}")
    n = len(indices)
    table = pa.table(
        {
            schema.VIDEO_ID: pa.array([unit["video_id"]] * n, pa.string()),
            schema.FRAME_INDEX: pa.array(indices, pa.int32()),
            schema.CATEGORY: pa.array([unit["category"]] * n, pa.string()),
            schema.IMAGE: pa.array(images, pa.binary()),
        },
        schema=pa.schema([UNIT_SCHEMA.field(c) for c in (schema.VIDEO_ID, schema.FRAME_INDEX, schema.CATEGORY,
                                                         schema.IMAGE)]),
    )
    skipped = [{"source": unit["source"], "file": s.pop("file", where), **s} for s in skipped]
    return table, skipped


def staging_name(unit: int) -> str:
    return f"unit-{unit:08d}.parquet"


def part_name(unit: int) -> str:
    return f"part-{unit:08d}.parquet"  # zero-padded: lexicographic file order is frame_id order


def ingest_unit(unit: dict, cfg: IngestConfig, staging_dir: str) -> dict:
    """Decode one unit into ``<staging_dir>/unit-<n>.parquet``; return a JSON-able summary.

    Errors come back as ``summary["error"]`` (a message naming the input) rather than as an exception, so
    the driver can raise them as they are instead of wrapped in Ray's task errors.
    Summary: unit, rows, staging (URI or ""), keys {video_id: [frame_index, ...]}, categories
    {category: rows}, columns (optional columns present), skipped [...], error.
    """
    summary: dict[str, Any] = {"unit": unit["unit"], "rows": 0, "staging": "", "keys": {}, "categories": {},
                               "columns": [], "skipped": [], "error": ""}
    try:
        table, skipped = decode_unit(unit, cfg)
    except (IngestError, storage.StorageError, schema.SchemaError) as exc:
        summary["error"] = str(exc)
        return summary
    except Exception as exc:  # an unexpected failure still names its input
        where = unit.get("uri") or unit["source"]
        summary["error"] = f"cannot ingest {where}: {type(exc).__name__}: {exc}"
        return summary
    summary["skipped"] = skipped
    summary["rows"] = table.num_rows
    summary["columns"] = [c for c in OPTIONAL if c in table.column_names]
    if table.num_rows:
        keys: dict[str, list[int]] = {}
        for vid, idx in zip(table.column(schema.VIDEO_ID).to_pylist(), table.column(schema.FRAME_INDEX).to_pylist()):
            keys.setdefault(vid, []).append(idx)
        summary["keys"] = keys
        counts = pc.value_counts(table.column(schema.CATEGORY)).to_pylist()
        summary["categories"] = {c["values"]: c["counts"] for c in counts}
        summary["staging"] = storage.join(staging_dir, staging_name(unit["unit"]))
        storage.write_parquet(table, summary["staging"])
    return summary


def check_duplicates(summaries: list[dict], units: list[dict]) -> None:
    """(video_id, frame_index) pairs must be unique across units too (e.g. two sources holding a video of
    the same name). Raises IngestError naming the pairs and the inputs that hold them."""
    owners: dict[str, list[int]] = {}
    for s in summaries:
        for vid in s["keys"]:
            owners.setdefault(vid, []).append(s["unit"])
    by_unit = {s["unit"]: s for s in summaries}
    for vid, holders in owners.items():
        if len(holders) < 2:
            continue
        for i, a in enumerate(holders):
            for b in holders[i + 1 :]:
                common = sorted(set(by_unit[a]["keys"][vid]) & set(by_unit[b]["keys"][vid]))
                if common:
                    shown = ", ".join(f"({vid!r}, {c})" for c in common[:5])
                    raise IngestError(
                        f"duplicate (video_id, frame_index) pairs {shown}"
                        + (f" and {len(common) - 5} more" if len(common) > 5 else "")
                        + f": in {_describe(units[a])} and in {_describe(units[b])}"
                    )


def _describe(unit: dict) -> str:
    if unit["kind"] == "images":
        return posixpath.dirname(unit["files"][0]) if unit["files"] else unit["source"]
    return unit["uri"]


def finalize_part(staging_uri: str, final_uri: str, offset: int, columns: list[str]) -> int:
    """Staging table → final part with frame_id = offset + row position and the run's common columns
    (``columns``: optional columns present in any unit, null-filled where this unit lacks them)."""
    table = storage.read_parquet(staging_uri)
    n = table.num_rows
    arrays = {schema.FRAME_ID: pa.array(np.arange(offset, offset + n, dtype=np.int64))}
    for name in (schema.VIDEO_ID, schema.FRAME_INDEX, schema.CATEGORY, *columns):
        field = schema.FRAMES.field(name)
        arrays[name] = table.column(name) if name in table.column_names else pa.nulls(n, field.type)
    fields = [schema.FRAMES.field(name) for name in arrays]
    storage.write_parquet(pa.table(arrays, schema=pa.schema(fields)), final_uri)
    storage.delete(staging_uri)
    return n
