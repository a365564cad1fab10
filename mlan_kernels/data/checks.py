"""Argument checks whose errors name the argument and the expected value."""


def check_int(name: str, value, minimum: int = 0) -> int:
    """value as an int >= minimum, or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_fraction(name: str, value) -> float:
    """value as a float in [0, 1], or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)
