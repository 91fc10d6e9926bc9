"""Shared setup of the data tests: tiny image files."""

from pathlib import Path

from PIL import Image


def write_image(path: Path, size=(20, 16), value=128) -> None:
    """A solid-colour RGB image file at ``path`` (its folders created), coloured by ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 0)).save(path)
