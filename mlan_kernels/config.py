"""`AdapterConfig`: the one carrier of the MM-Adapter settings.

`MMAdapter`, `patch`, `patch_llama`, `patch_clip_vision`, `build_lavin` and the training
program's `TrainConfig` all take one; their keyword shortcuts (`patch_llama(model, rank=4)`)
become one through `AdapterConfig.resolve`, the only place that does so. The field names are
the op's argument names (`mlan_kernels.mm_adapter`: `groups`, `scale`, `temperature`,
`dropout_p`); saved files written before the names settled are read through LEGACY_NAMES.

    field        op argument / shape                meaning
    rank         r of down_weight [r, D]            hidden width of the adapter (LaVIN 8)
    experts      E of up_weight [E, D, r/g]         up-projections, one per modality (LaVIN 2)
    groups       groups                             groups g of the up-projection (LaVIN 2)
    scale        scale                              s in y = x + s Σ_e w_e (...)
    temperature  temperature                        router softmax temperature t (LaVIN 10 / 5)
    dropout_p    dropout_p                          dropout probability on H, training only
    placement    -                                  "attn": before attention; "block": + MLP
    compat       -                                  None, or "lavin": LaVIN's own numerics
                                                    (routing weights rounded through fp16; a
                                                    vision tower's adapters route sequence-first)
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

PLACEMENTS = ("attn", "block")
COMPAT_MODES = (None, "lavin")
# Older spellings of a field, accepted only where a saved file holds them (adapter_config.json).
LEGACY_NAMES = {"dropout": "dropout_p"}


# Outside these the fp32 kernels overflow for ordinary activations: router logits / temperature
# (1/1e-300 is inf in fp32) and scale x adapter output (1e300 is inf in fp32) become inf, then nan.
TEMPERATURE_RANGE = (1e-4, 1e6)
MAX_ABS_SCALE = 1e6


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_settings(values: dict, spell=str):
    """ValueError for the first invalid setting in `values` ({field: value}, every field),
    naming it as spell(field): the field itself, or e.g. the command-line flag that set it."""
    for name in ("rank", "experts", "groups"):
        if not _is_int(values[name]) or values[name] < 1:
            raise ValueError(f"{spell(name)} must be a positive int, got {values[name]!r}")
    if values["rank"] % values["groups"] != 0:
        raise ValueError(f"{spell('groups')} {values['groups']} must divide {spell('rank')} "
                         f"{values['rank']}")
    low, high = TEMPERATURE_RANGE
    checks = (("scale", lambda v: True, "a finite number"),
              ("scale", lambda v: abs(v) <= MAX_ABS_SCALE, f"at most {MAX_ABS_SCALE:g} in magnitude "
                                                            f"(fp32 outputs overflow beyond)"),
              ("temperature", lambda v: v > 0, "finite and > 0"),
              ("temperature", lambda v: low <= v <= high, f"in [{low:g}, {high:g}] (fp32 router "
                                                          f"logits overflow outside)"),
              ("dropout_p", lambda v: 0.0 <= v < 1.0, "finite and in [0, 1)"))
    for name, check, expected in checks:
        if not (_is_number(values[name]) and check(values[name])):
            raise ValueError(f"{spell(name)} must be {expected}, got {values[name]!r}")
    for name, accepted in (("placement", PLACEMENTS), ("compat", COMPAT_MODES)):
        if values[name] not in accepted:
            raise ValueError(f"{spell(name)} must be one of {accepted}, got {values[name]!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """Settings of every MM-Adapter of one patched component (fields: module docstring).

    Validated at creation: ValueError naming the field and what it accepts.
    """
    rank: int = 8
    experts: int = 2
    groups: int = 2
    scale: float = 1.0
    temperature: float = 10.0
    dropout_p: float = 0.1
    placement: str = "attn"
    compat: Optional[str] = None

    def __post_init__(self):
        check_settings(self.to_dict())

    @classmethod
    def resolve(cls, config: "AdapterConfig" = None, **settings) -> "AdapterConfig":
        """`config`, or an AdapterConfig built from keyword shortcuts (rank=4, dropout_p=0.0,
        ...): the one place shortcuts become a config. Passing both, a non-AdapterConfig
        config, or an unknown keyword raises (TypeError / ValueError naming it)."""
        if config is None:
            unknown = sorted(set(settings) - set(cls.field_names()))
            if unknown:
                hint = "".join(f" ({old!r} is now {new!r})" for old, new in LEGACY_NAMES.items()
                               if old in unknown)
                raise TypeError(f"unknown adapter setting(s) {unknown}; AdapterConfig fields are "
                                f"{list(cls.field_names())}{hint}")
            return cls(**settings)
        if not isinstance(config, cls):
            raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__} "
                            f"(pass settings by keyword, e.g. rank=8)")
        if settings:
            raise ValueError(f"pass either config or keyword settings, not both "
                             f"(got config and {sorted(settings)})")
        return config

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(item.name for item in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, record: dict) -> "AdapterConfig":
        """The config of a saved record (adapter_config.json's per-component object): field
        names, or their LEGACY_NAMES spelling; other keys (hidden_size, ...) are ignored, and a
        field the record predates takes its default (compat: None)."""
        values = {LEGACY_NAMES.get(key, key): value for key, value in record.items()}
        return cls(**{name: values[name] for name in cls.field_names() if name in values})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
