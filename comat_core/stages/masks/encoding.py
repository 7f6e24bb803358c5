"""Binary mask ↔ bytes, for the ``mask`` column of the masks Parquet shards.

Two lossless encodings of a ``[H, W]`` boolean mask, row-major (C order):

* ``bitpack``: ``np.packbits`` of the flattened mask, 8 pixels per byte, MSB first; a fixed
  ``ceil(H*W/8)`` bytes (32 KiB at 512×512), cheap to decode, good for fragmented masks.
* ``rle``: run lengths as little-endian uint32, alternating background/foreground runs and
  starting with a background run (0 when the first pixel is set); a few hundred bytes for the
  compact blobs SAM produces.

The shape is not stored in the bytes: each row carries ``mask_resolution`` (masks are square).
"""

from __future__ import annotations

import numpy as np

from comat_core.errors import ConfigError, IntegrityError

ENCODINGS = ("bitpack", "rle")


def encode_mask(mask: np.ndarray, encoding: str) -> bytes:
    """A boolean ``[H, W]`` mask (any array whose nonzero entries are foreground) → bytes."""
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    if encoding == "bitpack":
        return np.packbits(flat).tobytes()
    if encoding == "rle":
        return _runs(flat).astype("<u4").tobytes()
    raise ConfigError(f"unknown mask encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")


def decode_mask(data: bytes, shape: tuple[int, int], encoding: str) -> np.ndarray:
    """Bytes from ``encode_mask`` → a boolean ``[H, W]`` mask; a length mismatch is an IntegrityError."""
    size = int(shape[0]) * int(shape[1])
    if encoding == "bitpack":
        if len(data) != (size + 7) // 8:
            raise IntegrityError(f"bit-packed mask has {len(data)} bytes, expected {(size + 7) // 8} for {shape}")
        flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=size).astype(bool)
    elif encoding == "rle":
        runs = np.frombuffer(data, dtype="<u4").astype(np.int64)
        if runs.sum() != size:
            raise IntegrityError(f"run-length mask covers {int(runs.sum())} pixels, expected {size} for {shape}")
        values = (np.arange(len(runs)) % 2).astype(bool)
        flat = np.repeat(values, runs)
    else:
        raise ConfigError(f"unknown mask encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    return flat.reshape(shape)


def _runs(flat: np.ndarray) -> np.ndarray:
    """Alternating run lengths of a flat boolean array, starting with a (possibly empty) background run."""
    if flat.size == 0:
        return np.zeros(1, dtype=np.int64)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds)
    return np.concatenate([[0], runs]) if flat[0] else runs
