"""Handlers the tests load into worker processes with --handler handlers:NAME."""

import time


def slow(text: str) -> str:
    """Sleep for the number of seconds given as input, then return it."""
    time.sleep(float(text))
    return text


def fail(text: str) -> str:
    raise ValueError(f"cannot handle {text!r}")


def not_a_string(text: str) -> int:
    return len(text)
