import numpy as np
import pytest
import torch

from piggyback_serve.masks import codec
from piggyback_serve.masks.codec import BITMAP, ELIAS_FANO, CodingError, Mask


def _positions(numel: int, fraction: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.flatnonzero(rng.random(numel) < fraction)


@pytest.mark.parametrize("coding", codec.CODINGS)
@pytest.mark.parametrize(
    "numel,fraction", [(1, 0.0), (1, 1.0), (7, 0.5), (9, 0.2), (288, 0.01), (100_003, 0.012)]
)
def test_round_trip_at_the_exact_size(coding, numel, fraction):
    off = _positions(numel, fraction)
    stream = codec.encode(coding, off, numel)
    assert stream.dtype == np.uint8 and stream.size == codec.coded_size(coding, off.size, numel)
    assert np.array_equal(codec.decode(coding, stream, off.size, numel), off)


def test_edge_positions_and_every_weight_off():
    numel = 1000
    for off in (np.array([0]), np.array([numel - 1]), np.array([0, numel - 1]), np.arange(numel)):
        stream = codec.encode(ELIAS_FANO, off, numel)
        assert np.array_equal(codec.decode(ELIAS_FANO, stream, off.size, numel), off)


def test_the_smallest_coding_is_chosen():
    numel = 100_000
    assert codec.smallest(0, numel) == ELIAS_FANO  # zero bytes
    assert codec.smallest(1000, numel) == ELIAS_FANO
    assert codec.smallest(60_000, numel) == BITMAP
    # Elias–Fano costs about 2 + log2(numel / n) bits per switched-off weight.
    assert codec.coded_size(ELIAS_FANO, 1000, numel) < 1000 * (2 + np.log2(100) + 1) / 8


def _ef_raw(off: np.ndarray, numel: int) -> np.ndarray:
    """Elias–Fano of any positions (unsorted, repeated, out of range) that still fit the stream."""
    low = codec.low_bits(off.size, numel)
    lows = ((off[:, None] >> np.arange(low - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    high = np.zeros(off.size + ((numel - 1) >> low) + 1, dtype=np.uint8)
    high[(off >> low) + np.arange(off.size)] = 1
    return np.concatenate([np.packbits(lows), np.packbits(high)])


def test_malformed_streams_are_refused_saying_why():
    numel = 1024  # 4 positions: l = 8
    good = np.array([3, 10, 500, 1000])
    stream = codec.encode(ELIAS_FANO, good, numel)
    out_of_range = np.array([3, 10, 500, ((numel - 1) >> 8) + 1 << 8])
    cases = {
        "truncated": (stream[:-1], 4, "truncated"),
        "longer": (np.concatenate([stream, [0]]).astype(np.uint8), 4, "longer than"),
        "count": (stream, 5, "expected"),
        "out of range": (_ef_raw(out_of_range, numel), 4, "out of range"),
        "unsorted": (_ef_raw(np.array([3, 2, 500, 1000]), numel), 4, "not sorted"),
        "repeated": (_ef_raw(np.array([3, 3, 500, 1000]), numel), 4, "not sorted"),
        "count beyond numel": (stream, numel + 1, "outside"),
    }
    for case, (data, count, message) in cases.items():
        with pytest.raises(CodingError, match=message):
            codec.decode(ELIAS_FANO, data, count, numel)
        assert case


def test_a_count_that_disagrees_with_the_bits():
    numel, off = 1000, np.array([1, 2, 3])
    bitmap = codec.encode(BITMAP, off, numel)
    with pytest.raises(CodingError, match="count says 4"):
        codec.decode(BITMAP, bitmap, 4, numel)
    ef = codec.encode(ELIAS_FANO, off, numel)  # l = 8: 3 low bytes, then 7 high bits
    assert ef.size == 4 and ef[-1] == 0b11100000
    ef[-1] |= 0b00000010  # one more high bit than the count allows, same length
    with pytest.raises(CodingError, match="count says 3"):
        codec.decode(ELIAS_FANO, ef, 3, numel)


def test_unknown_coding_and_huge_declared_sizes_are_refused_before_decoding():
    with pytest.raises(CodingError, match="unknown coding 'zstd'"):
        codec.decode("zstd", np.zeros(4, np.uint8), 1, 32)
    # A lying count/numel claims 10^15 weights: refused on length alone, nothing allocated.
    with pytest.raises(CodingError, match="expected"):
        codec.decode(ELIAS_FANO, np.zeros(16, np.uint8), 10**14, 10**15)
    with pytest.raises(CodingError, match="expected"):
        codec.decode(BITMAP, np.zeros(16, np.uint8), 0, 10**15)


def test_mask_views_agree():
    keep = torch.rand(3, 5, 7) < 0.7
    from_bits = Mask.from_bool(keep)
    off = torch.from_numpy(np.flatnonzero(~keep.reshape(-1).numpy()))
    from_off = Mask(numel=keep.numel(), off=off)
    for mask in (from_bits, from_off):
        assert torch.equal(mask.dense(keep.shape), keep)
        assert torch.equal(mask.switched_off(keep.numel()), off)
    assert from_off.switched_off(keep.numel()) is off  # returned as decoded: no bitmap trip
    with pytest.raises(ValueError):
        from_bits.switched_off(keep.numel() + 1)
    coding, count, stream = from_bits.coded(BITMAP)
    assert (coding, count) == (BITMAP, off.numel()) and stream.size == (keep.numel() + 7) // 8
