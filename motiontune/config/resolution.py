"""Sizes as configs write them."""


def parse_resolution(text: str) -> tuple[int, int]:
    """`"512"` → (512, 512); `"832x480"` → height 480, width 832 (written WIDTHxHEIGHT)."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers, default=0) < 16:
        raise ValueError(f"resolution must be a size like '480' or '832x480' (width x height, each >= 16), got {text!r}")
    if len(numbers) == 1:
        return numbers[0], numbers[0]
    width, height = numbers
    return height, width
