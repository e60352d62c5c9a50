"""`open_image`: read an image file, URL or base64 string completely, keeping its mode; errors name the source.

Both PRG pipelines, `PRGImageProcessor` (given a path) and the `prg-hub` command read images with it, and leave
the RGB conversion to `prg_hub.image_conversion.to_rgb`: transformers' own `load_image` converts to RGB with
PIL, which saturates 16-bit images and drops the alpha channel before the processor can see them.

Every failure is an `UnreadableImageError` whose message is `SOURCE: cannot read image (REASON)`: a missing
path, a directory, an empty, truncated or non-image file, and an image of more pixels than
`PIL.Image.MAX_IMAGE_PIXELS` (PIL's decompression-bomb guard, which otherwise only warns up to twice that limit).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.request
import warnings

from PIL import Image

URL_SCHEMES = ("http://", "https://")
DATA_URI_PREFIX = "data:image/"
MAX_SHOWN_CHARS = 100  # of a base64 string named in an error message
# File extensions taken as images when a folder is listed (`prg-hub` commands, the demo's examples).
IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp"}
)


class UnreadableImageError(ValueError):
    """An image source that cannot be decoded; `source` names it and `reason` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: cannot read image ({reason})")
        self.source = source
        self.reason = reason


def open_image(source: str | os.PathLike, timeout: float | None = None) -> Image.Image:
    """The fully decoded image at `source`, in its stored mode (first frame of an animation); no file stays open.

    A path-like `source` is a file. A string is an http(s) URL (fetched with `timeout` seconds), a `data:image/`
    URI, a file path, or else base64-encoded image bytes.
    """
    name = shown = os.fspath(source)
    try:
        if isinstance(source, os.PathLike) or os.path.exists(name):
            return decode(name)
        if name.startswith(URL_SCHEMES):
            with urllib.request.urlopen(name, timeout=timeout) as response:  # follows redirects
                return decode(io.BytesIO(response.read()))
        if len(name) > MAX_SHOWN_CHARS:
            shown = f"{name[:MAX_SHOWN_CHARS]}..."
        if name.startswith(DATA_URI_PREFIX):
            return decode(io.BytesIO(base64.b64decode(name.split(",", 1)[-1], validate=True)))
        try:
            return decode(io.BytesIO(base64.b64decode(name, validate=True)))
        except (binascii.Error, Image.UnidentifiedImageError):
            raise FileNotFoundError("no such file or directory") from None
    except Image.DecompressionBombError as error:  # also raised for DecompressionBombWarning, see `decode`
        raise UnreadableImageError(
            shown, f"{error} Raise PIL.Image.MAX_IMAGE_PIXELS to read it if the file is trusted."
        ) from error
    except Exception as error:  # PIL's plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise UnreadableImageError(shown, str(error) or type(error).__name__) from error


def decode(file: str | io.BytesIO) -> Image.Image:
    """Open and decode `file` completely, turning PIL's decompression-bomb warning into `DecompressionBombError`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(file) as image:
                image.load()
        except Image.DecompressionBombWarning as warning:
            raise Image.DecompressionBombError(str(warning)) from None
    return image
