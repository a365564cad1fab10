"""LLaVA-style instruction records and a loader that skips bad ones instead of failing.

A record on disk (one JSON object; `.json` = a list of them, `.jsonl` = one per line):
    {"id": "...", "image": "rel/or/abs.png" (absent = text-only),
     "conversations": [{"from": "human", "value": "<image>\\n..."},
                       {"from": "gpt", "value": "..."}]}
"user"/"assistant" are accepted as aliases of "human"/"gpt". Every skipped record is counted
by reason in the LoadReport and warned about (naming its id, or its line/item number).
"""
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
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
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as error:
                    yield f"line {number}", BadRecord("not_json", f"not JSON ({error.msg})")
    elif path.suffix == ".json":
        with path.open(encoding="utf-8") as file:
            try:
                items = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"path {str(path)!r}: a .json file must hold a JSON list of "
                                 f"records ({error})") from error
        if not isinstance(items, list):
            raise ValueError(f"path {str(path)!r}: a .json file must hold a JSON list of records, "
                             f"got {type(items).__name__}")
        for number, item in enumerate(items):
            yield f"item {number}", item
    else:
        raise ValueError(f"path must end in .json or .jsonl, got {str(path)!r}")


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


def _resolve_image(value, image_root: Path, check_images: bool) -> Optional[str]:
    """Absolute image path of an "image" value (None if absent), or BadRecord."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRecord("bad_image_field", f'"image" must be a non-empty string, got {value!r}')
    path = Path(value) if Path(value).is_absolute() else image_root / value
    if check_images:
        if not path.is_file():
            raise BadRecord("image_missing", f"image {str(path)!r} does not exist")
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:      # PIL raises many types for corrupt files
            raise BadRecord("image_unreadable", f"image {str(path)!r} unreadable ({error})")
    return str(path.resolve())


def parse_record(obj, where: str, image_root: Path, check_images: bool = True) -> Record:
    """A Record from one parsed JSON object, or BadRecord. where: fallback id, e.g. "line 3"."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord("not_object", f"expected a JSON object, got {type(obj).__name__}")
    turns = _parse_turns(obj.get("conversations"))
    image = _resolve_image(obj.get("image"), image_root, check_images)
    return Record(id=str(obj.get("id", where)), turns=turns, image=image)


def load_records(path, image_root=None, check_images: bool = True
                 ) -> tuple[list[Record], LoadReport]:
    """Records of a LLaVA-style .json/.jsonl file; bad records are skipped, warned, counted.

    image_root: directory relative image paths start from (default: the file's directory).
    check_images: open every image with PIL and verify it (skip missing/unreadable ones).
    Raises FileNotFoundError (no such path) or ValueError (unknown extension, .json not a list).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not a file")
    root = Path(image_root) if image_root is not None else path.parent
    records, reasons = [], Counter()
    for where, obj in _raw_objects(path):
        try:
            records.append(parse_record(obj, where, root, check_images))
        except BadRecord as bad:
            record_id = obj.get("id") if isinstance(obj, dict) else None
            name = f"record {record_id!r}" if record_id is not None else where
            warnings.warn(f"{path.name}: skipping {name}: {bad.reason}: {bad}", stacklevel=2)
            reasons[bad.reason] += 1
    report = LoadReport(loaded=len(records), skipped=sum(reasons.values()), reasons=dict(reasons))
    return records, report
