"""The one validation helper every config's ``__post_init__`` uses."""


def check(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``: a config names the field and the bad value."""
    if not cond:
        raise ValueError(msg)
