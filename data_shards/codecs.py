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


def _npy_view(buf) -> np.ndarray:
    """Zero-copy view of an .npy payload (bytes, or a memoryview into an mmapped shard).

    The header is parsed with numpy's own literal-only parser; object dtypes, the only ones
    that would need pickle, are refused. The view is read-only.
    """
    mv = memoryview(buf)
    f = io.BytesIO(mv[: min(len(mv), 1 << 16)])
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise CodecError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise CodecError("object arrays cannot be decoded (they would need pickle)")
    count = int(np.prod(shape))
    if f.tell() + count * dtype.itemsize != len(mv):
        raise CodecError(f".npy payload is {len(mv)} bytes, header promises {f.tell() + count * dtype.itemsize}")
    arr = np.frombuffer(mv, dtype=dtype, count=count, offset=f.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def decode(data, codec: str, shape=None, dtype=None) -> np.ndarray:
    """Decode one member (bytes or memoryview). `shape`/`dtype` are required for lz4 and
    checked for npy. npy gives a read-only zero-copy view; lz4 a new buffer."""
    try:
        if codec == "npy":
            arr = _npy_view(data)
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
