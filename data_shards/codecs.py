"""Volume codecs: bytes <-> int16/uint8 arrays, bit-exact, never pickled.

`npy` is plain .npy (DALI's CPU numpy decoder reads it). `lz4` is one raw LZ4 *block*
(no frame header), which DALI's GPU `fn.decoders.inflate(shape=..., dtype=...)` decodes;
shape and dtype live in the sample's JSON.
"""
from __future__ import annotations

import io

import lz4.block
import numpy as np

CODECS = ("npy", "lz4")


class CodecError(ValueError):
    pass


def encode(array: np.ndarray, codec: str) -> bytes:
    array = np.ascontiguousarray(array)
    if array.dtype == object:
        raise CodecError("object arrays cannot be stored (they would need pickle)")
    if codec == "npy":
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        return buf.getvalue()
    if codec == "lz4":
        return lz4.block.compress(array.tobytes(order="C"), mode="default", store_size=False)
    raise CodecError(f"unknown codec {codec!r}; choose one of {CODECS}")


def decode(data: bytes, codec: str, shape=None, dtype=None) -> np.ndarray:
    """Decode one member. `shape`/`dtype` are required for lz4 and checked for npy."""
    try:
        if codec == "npy":
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        elif codec == "lz4":
            if shape is None or dtype is None:
                raise CodecError("lz4 volumes need shape and dtype from the sample metadata")
            dt = np.dtype(dtype)
            n = int(np.prod(shape)) * dt.itemsize
            raw = lz4.block.decompress(data, uncompressed_size=n)
            if len(raw) != n:
                raise CodecError(f"lz4 block decoded to {len(raw)} bytes, expected {n}")
            arr = np.frombuffer(raw, dtype=dt).reshape(shape)
        else:
            raise CodecError(f"unknown codec {codec!r}; choose one of {CODECS}")
    except CodecError:
        raise
    except Exception as e:  # corrupt payloads raise many types; name them uniformly
        raise CodecError(f"cannot decode {codec} payload: {e}") from e
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise CodecError(f"decoded shape {tuple(arr.shape)} != metadata shape {tuple(shape)}")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise CodecError(f"decoded dtype {arr.dtype} != metadata dtype {np.dtype(dtype)}")
    return arr
