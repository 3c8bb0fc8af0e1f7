import numpy as np
import pytest

from data_shards import codecs


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("dtype", [np.int16, np.uint8])
def test_round_trip_bit_exact(codec, dtype):
    rng = np.random.default_rng()
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, size=(7, 11, 13), endpoint=True).astype(dtype)
    out = codecs.decode(codecs.encode(a, codec), codec, a.shape, a.dtype)
    assert out.dtype == a.dtype and out.shape == a.shape
    assert out.tobytes() == a.tobytes()


def test_lz4_is_a_raw_block_that_dali_inflate_can_read():
    import lz4.block

    a = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    data = codecs.encode(a, "lz4")
    assert not data.startswith(b"\x04\x22\x4d\x18")  # no LZ4 frame magic: a bare block
    assert lz4.block.decompress(data, uncompressed_size=a.nbytes) == a.tobytes()


def test_npy_never_unpickles():
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(codecs.CodecError, match="would need pickle"):
        codecs.decode(buf.getvalue(), "npy")
    with pytest.raises(codecs.CodecError, match="pickle"):
        codecs.encode(np.array([{"a": 1}], dtype=object), "npy")


def test_npy_views_memoryviews_without_copy():
    a = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    buf = bytearray(codecs.encode(a, "npy"))
    assert not codecs.decode(bytes(buf), "npy").flags.writeable  # read-only source, read-only view
    view = codecs.decode(memoryview(buf), "npy", a.shape, "int16")
    assert np.array_equal(view, a)
    buf[-2:] = b"\x39\x05"  # the decoded array is a view on the buffer: no copy was made
    assert view[-1, -1, -1] == 0x0539
    with pytest.raises(codecs.CodecError, match="header promises"):
        codecs.decode(memoryview(buf)[:-2], "npy")


def test_wrong_metadata_is_caught():
    a = np.zeros((4, 4, 4), np.int16)
    with pytest.raises(codecs.CodecError, match="shape"):
        codecs.decode(codecs.encode(a, "npy"), "npy", (4, 4, 5), "int16")
    with pytest.raises(codecs.CodecError):
        codecs.decode(codecs.encode(a, "lz4"), "lz4", (4, 4, 5), "int16")
    with pytest.raises(codecs.CodecError):
        codecs.decode(b"\x00garbage", "lz4", (4, 4, 4), "int16")
