"""LLaVA-style instruction records and a loader that skips bad ones instead of failing.

A record on disk (one JSON object; `.json` = a list of them, `.jsonl` = one per line):
    {"id": "...", "image": "rel/or/abs.png" (absent = text-only),
     "conversations": [{"from": "human", "value": "<image>\\n..."},
                       {"from": "gpt", "value": "..."}]}
"user"/"assistant" are accepted as aliases of "human"/"gpt". Every skipped record is counted
by reason in the LoadReport and warned about (naming its id, or its line/item number). Any
exception raised while reading or checking one record (a line nested too deep for the JSON
parser, bytes that are not UTF-8, a path the OS rejects, ...) skips that record only; images
above `max_image_pixels`, with a side above MAX_IMAGE_SIDE or an aspect ratio above
MAX_IMAGE_ASPECT are rejected from their header, before anything is decoded.

Image paths stay inside the image folder: a relative path is joined to the folder and resolved
(symlinks followed, ".." collapsed) and refused when the result leaves the folder; an absolute
path is refused unless `allow_absolute_images=True`. Both checks read no file (only the
directory entries that resolving a symlink needs), so a refused path is never opened.
"""
import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
# 4096 x 4096: far above what CLIP reads (224-336 px), far below a decompression bomb
# (a 12000 x 12000 PNG of 140 KB decodes to ~0.4 GB of RGB per read, per DataLoader worker).
MAX_IMAGE_PIXELS = 4096 * 4096
# A 16,000,000 x 1 PNG is under the pixel limit yet costs ~0.5 GB per decode (and means nothing
# to a 224-336 px vision tower): sides and aspect ratios are bounded too.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_ASPECT = 32
DATA_SUFFIXES = (".json", ".jsonl")
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass
class Record:
    """One conversation. turns: (role in {"human", "gpt"}, text without "<image>", stripped);
    image: absolute path or None (text-only)."""
    id: str
    turns: list[tuple[str, str]]
    image: Optional[str] = None

    @property
    def has_image(self) -> bool:
        return self.image is not None


@dataclass
class LoadReport:
    """loaded/skipped record counts; images: loaded records with an image; reasons: skip
    reason -> count."""
    loaded: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    images: int = 0

    def describe(self, name: str) -> str:
        """One line: "NAME: 120 records (80 with images), 3 skipped (image_missing 2, ...)"."""
        line = f"{name}: {self.loaded} records ({self.images} with images)"
        if not self.skipped:
            return line + ", none skipped"
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.reasons.items()))
        return line + f", {self.skipped} skipped ({reasons})"


class BadRecord(ValueError):
    """A record that is skipped; `reason` is the LoadReport key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _raw_objects(path: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed object or BadRecord) for each record of a .json or .jsonl file."""
    if path.suffix == ".jsonl":
        with path.open("rb") as lines:            # decoded per line: one bad byte skips one line
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                yield f"line {number}", _parse_line(line)
    elif path.suffix == ".json":
        with path.open(encoding="utf-8") as file:
            try:
                items = json.load(file)
            except (ValueError, RecursionError) as error:   # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"path {str(path)!r}: a .json file must hold a JSON list of "
                                 f"records ({type(error).__name__}: {error})") from error
        if not isinstance(items, list):
            raise ValueError(f"path {str(path)!r}: a .json file must hold a JSON list of records, "
                             f"got {type(items).__name__}")
        for number, item in enumerate(items):
            yield f"item {number}", item
    else:
        raise ValueError(f"path must end in .json or .jsonl, got {str(path)!r}")


def _parse_line(line: bytes):
    """The JSON object of one .jsonl line, or a BadRecord saying why not."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return BadRecord("not_utf8", f"not UTF-8 ({error.reason} at byte {error.start})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return BadRecord("not_json", f"not JSON ({error.msg})")
    except RecursionError:
        return BadRecord("not_json", "not JSON (nested too deeply for the parser)")


def _parse_turns(conversations) -> list[tuple[str, str]]:
    """[(role, text)] of a "conversations" value, or BadRecord."""
    if not isinstance(conversations, list):
        raise BadRecord("bad_conversations", '"conversations" missing or not a list')
    if not conversations:
        raise BadRecord("empty_conversation", '"conversations" is empty')
    turns = []
    for number, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                and isinstance(turn.get("value"), str)):
            raise BadRecord("bad_turn", f'turn {number} needs string "from" and "value"')
        if not _encodable(turn["value"]):
            raise BadRecord("not_utf8", f"turn {number} holds a lone surrogate (a JSON \\ud800-"
                            f"\\udfff escape without its pair): not text a tokenizer accepts")
        role = ROLE_ALIASES.get(turn["from"].lower())
        if role is None:
            raise BadRecord("unknown_role", f'turn {number} has role {turn["from"]!r}, expected '
                            f"one of {sorted(ROLE_ALIASES)}")
        turns.append((role, turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()))
    if turns[0][0] != "human":
        raise BadRecord("first_turn_not_human", f'first turn is {turns[0][0]!r}, expected "human"')
    if all(role != "gpt" for role, _ in turns):
        raise BadRecord("no_gpt_turn", 'no "gpt" turn to learn from')
    return turns


def _encodable(text: str) -> bool:
    """Whether `text` is valid Unicode (json.loads keeps a lone surrogate escape as is)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def image_size_problem(width: int, height: int, max_pixels: Optional[int] = MAX_IMAGE_PIXELS
                       ) -> Optional[str]:
    """Why an image of width x height (from its header) is refused, or None when it is not:
    more than max_pixels pixels (None = no pixel limit), a side above MAX_IMAGE_SIDE, or an
    aspect ratio above MAX_IMAGE_ASPECT."""
    if max_pixels is not None and width * height > max_pixels:
        return f"{width}x{height} = {width * height} pixels, above max_image_pixels={max_pixels}"
    if max(width, height) > MAX_IMAGE_SIDE:
        return f"{width}x{height}: a side above {MAX_IMAGE_SIDE} pixels"
    if min(width, height) < 1 or max(width, height) > MAX_IMAGE_ASPECT * min(width, height):
        return f"{width}x{height}: aspect ratio above {MAX_IMAGE_ASPECT}"
    return None


def _check_image(path: Path, max_pixels: Optional[int]):
    """BadRecord unless `path` is an image PIL can read whose size passes image_size_problem;
    the size comes from the header, so an oversized image is never decoded."""
    if not path.is_file():
        raise BadRecord("image_missing", f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            problem = image_size_problem(*image.size, max_pixels)
            if problem is not None:
                raise BadRecord("image_too_large", f"image {str(path)!r} is {problem}")
            image.verify()
    except BadRecord:
        raise
    except Exception as error:      # PIL raises many types for corrupt files
        raise BadRecord("image_unreadable", f"image {str(path)!r} unreadable ({error})")


def confined_image_path(value, image_root: Path, allow_absolute: bool = False) -> Path:
    """The resolved path of an "image" value, or BadRecord: "image_absolute" for an absolute
    path (unless allow_absolute), "image_outside_folder" for a relative one that resolves
    (through "..", or a symlink anywhere on the way) outside `image_root`. Reads no file."""
    if not isinstance(value, str) or not value:
        raise BadRecord("bad_image_field", f'"image" must be a non-empty string, got {value!r}')
    if Path(value).is_absolute():
        if not allow_absolute:
            raise BadRecord("image_absolute", f"image {value!r} is an absolute path (paths are "
                            f"relative to the image folder; allow_absolute_images=True accepts it)")
        return Path(value).resolve()
    root = image_root.resolve()
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise BadRecord("image_outside_folder", f"image {value!r} resolves to {str(path)!r}, "
                        f"outside the image folder {str(root)!r}")
    return path


def _resolve_image(value, image_root: Path, check_images: bool,
                   max_pixels: Optional[int] = MAX_IMAGE_PIXELS,
                   allow_absolute: bool = False) -> Optional[str]:
    """Absolute image path of an "image" value (None if absent), or BadRecord."""
    if value is None:
        return None
    path = confined_image_path(value, image_root, allow_absolute)
    if check_images:
        _check_image(path, max_pixels)
    return str(path)


def parse_record(obj, where: str, image_root: Path, check_images: bool = True,
                 max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS,
                 allow_absolute_images: bool = False) -> Record:
    """A Record from one parsed JSON object, or BadRecord. where: fallback id, e.g. "line 3"."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord("not_object", f"expected a JSON object, got {type(obj).__name__}")
    turns = _parse_turns(obj.get("conversations"))
    image = _resolve_image(obj.get("image"), image_root, check_images, max_image_pixels,
                           allow_absolute_images)
    record_id = str(obj.get("id", where))
    if not _encodable(record_id):
        raise BadRecord("not_utf8", '"id" holds a lone surrogate')
    return Record(id=record_id, turns=turns, image=image)


def load_records(path, image_root=None, check_images: bool = True,
                 max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS,
                 allow_absolute_images: bool = False) -> tuple[list[Record], LoadReport]:
    """Records of a LLaVA-style .json (a list, LLaVA's own format) or .jsonl file; bad
    records are skipped, warned, counted.

    image_root: the image folder relative image paths start from (LLaVA's --image_folder;
    default: the file's directory); paths leaving it are skipped ("image_outside_folder"),
    absolute ones too ("image_absolute") unless allow_absolute_images. check_images: open
    every image with PIL and verify it (skip missing/unreadable ones and those refused by
    image_size_problem from the header; max_image_pixels None = no pixel limit).
    Any exception from one record skips it (reason "error" when none of the named ones fits).
    Raises FileNotFoundError (no such path) or ValueError (unknown extension, .json not a list).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not a file")
    if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or not isinstance(
            max_image_pixels, int) or max_image_pixels < 1):
        raise ValueError(f"max_image_pixels must be a positive int or None, got {max_image_pixels!r}")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image_root {str(root)!r} is not a directory")
    records, reasons = [], Counter()
    for where, obj in _raw_objects(path):
        try:
            records.append(parse_record(obj, where, root, check_images, max_image_pixels,
                                        allow_absolute_images))
        except Exception as error:              # one record never stops the others
            bad = error if isinstance(error, BadRecord) else BadRecord(
                "error", f"{type(error).__name__}: {error}")
            record_id = obj.get("id") if isinstance(obj, dict) else None
            name = f"record {_short(record_id)}" if record_id is not None else where
            warnings.warn(f"{path.name}: skipping {name}: {bad.reason}: {_cut(str(bad), 240)}",
                          stacklevel=2)
            reasons[bad.reason] += 1
    report = LoadReport(loaded=len(records), skipped=sum(reasons.values()), reasons=dict(reasons),
                        images=sum(record.has_image for record in records))
    return records, report


def find_data_files(path) -> tuple[Path, Optional[Path]]:
    """(training file, held-out file or None) of a --data value: a .json/.jsonl file is the
    training file; a directory holds train.json or train.jsonl and optionally eval.json or
    eval.jsonl. FileNotFoundError / ValueError naming `path` otherwise."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ValueError(f"data {str(path)!r}: expected a .json or .jsonl file")
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(f"data {str(path)!r}: no such file or directory")

    def first(stem):
        found = [path / (stem + suffix) for suffix in DATA_SUFFIXES if (path / (stem + suffix)).is_file()]
        if len(found) > 1:
            raise ValueError(f"data {str(path)!r}: both {found[0].name} and {found[1].name}; keep one")
        return found[0] if found else None

    train = first("train")
    if train is None:
        raise FileNotFoundError(f"data {str(path)!r}: the directory holds no train.json or "
                                f"train.jsonl (pass the dataset file itself instead)")
    return train, first("eval")


def split_records(records: Sequence[Record], fraction: float, seed: int = 0
                  ) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records): round(fraction * n) records drawn with `seed`
    (at least one when fraction > 0), both lists in file order. fraction in [0, 1)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    count = max(1, round(fraction * len(records))) if fraction > 0 else 0
    if count >= len(records) and count:
        raise ValueError(f"fraction {fraction} of {len(records)} records leaves no training record")
    held = set(random.Random(seed).sample(range(len(records)), count))
    return ([record for i, record in enumerate(records) if i not in held],
            [record for i, record in enumerate(records) if i in held])


def _short(value, limit: int = 80) -> str:
    """repr of a record id for a warning, cut to `limit` characters."""
    try:
        text = repr(value)
    except Exception:                           # a repr that raises (nested too deeply)
        text = f"<{type(value).__name__}>"
    return _cut(text, limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
