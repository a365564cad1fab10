"""LLaVA-style instruction records and a loader that skips bad ones instead of failing.

A record on disk (one JSON object; `.json` = a list of them, `.jsonl` = one per line):
    {"id": "...", "image": "rel/or/abs.png" (absent = text-only),
     "conversations": [{"from": "human", "value": "<image>\\n..."},
                       {"from": "gpt", "value": "..."}]}
"user"/"assistant" are accepted as aliases of "human"/"gpt". Every skipped record is counted
by reason in the LoadReport and warned about (naming its id, or its line/item number). Any
exception raised while reading or checking one record (a line nested too deep for the JSON
parser, bytes that are not UTF-8, a path the OS rejects, ...) skips that record only; images
above `max_image_pixels` are rejected from their header, before anything is decoded.
"""
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
# 4096 x 4096: far above what CLIP reads (224-336 px), far below a decompression bomb
# (a 12000 x 12000 PNG of 140 KB decodes to ~0.4 GB of RGB per read, per DataLoader worker).
MAX_IMAGE_PIXELS = 4096 * 4096
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
    """loaded/skipped record counts; reasons: skip reason -> count."""
    loaded: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


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


def _check_image(path: Path, max_pixels: Optional[int]):
    """BadRecord unless `path` is an image PIL can read with at most max_pixels pixels; the
    size comes from the header, so an oversized image is never decoded."""
    if not path.is_file():
        raise BadRecord("image_missing", f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise BadRecord("image_too_large", f"image {str(path)!r} is {width}x{height} = "
                                f"{width * height} pixels, above max_image_pixels={max_pixels}")
            image.verify()
    except BadRecord:
        raise
    except Exception as error:      # PIL raises many types for corrupt files
        raise BadRecord("image_unreadable", f"image {str(path)!r} unreadable ({error})")


def _resolve_image(value, image_root: Path, check_images: bool,
                   max_pixels: Optional[int] = MAX_IMAGE_PIXELS) -> Optional[str]:
    """Absolute image path of an "image" value (None if absent), or BadRecord."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRecord("bad_image_field", f'"image" must be a non-empty string, got {value!r}')
    path = Path(value) if Path(value).is_absolute() else image_root / value
    if check_images:
        _check_image(path, max_pixels)
    return str(path.resolve())


def parse_record(obj, where: str, image_root: Path, check_images: bool = True,
                 max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS) -> Record:
    """A Record from one parsed JSON object, or BadRecord. where: fallback id, e.g. "line 3"."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord("not_object", f"expected a JSON object, got {type(obj).__name__}")
    turns = _parse_turns(obj.get("conversations"))
    image = _resolve_image(obj.get("image"), image_root, check_images, max_image_pixels)
    record_id = str(obj.get("id", where))
    if not _encodable(record_id):
        raise BadRecord("not_utf8", '"id" holds a lone surrogate')
    return Record(id=record_id, turns=turns, image=image)


def load_records(path, image_root=None, check_images: bool = True,
                 max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS
                 ) -> tuple[list[Record], LoadReport]:
    """Records of a LLaVA-style .json/.jsonl file; bad records are skipped, warned, counted.

    image_root: directory relative image paths start from (default: the file's directory).
    check_images: open every image with PIL and verify it (skip missing/unreadable ones and
    those above max_image_pixels = width x height, read from the header; None = no limit).
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
    records, reasons = [], Counter()
    for where, obj in _raw_objects(path):
        try:
            records.append(parse_record(obj, where, root, check_images, max_image_pixels))
        except Exception as error:              # one record never stops the others
            bad = error if isinstance(error, BadRecord) else BadRecord(
                "error", f"{type(error).__name__}: {error}")
            record_id = obj.get("id") if isinstance(obj, dict) else None
            name = f"record {_short(record_id)}" if record_id is not None else where
            warnings.warn(f"{path.name}: skipping {name}: {bad.reason}: {_cut(str(bad), 240)}",
                          stacklevel=2)
            reasons[bad.reason] += 1
    report = LoadReport(loaded=len(records), skipped=sum(reasons.values()), reasons=dict(reasons))
    return records, report


def _short(value, limit: int = 80) -> str:
    """repr of a record id for a warning, cut to `limit` characters."""
    try:
        text = repr(value)
    except Exception:                           # a repr that raises (nested too deeply)
        text = f"<{type(value).__name__}>"
    return _cut(text, limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
