"""Lossless coding of integer symbol streams (quantized codes, sparsity gaps): Huffman, ANS, zstd.

Every coder returns a :class:`CodedStream` whose ``bits`` count everything a decoder needs besides the
stream's length: the payload and the code table or model parameters. Decoding gives back exactly the
symbols that were coded.

- ``huffman``: canonical Huffman, as Deep Compression and focused quantization report. Our own (about
  40 lines, :mod:`heapq`) because what we need is the canonical form: the table is just the sorted
  alphabet and one code length per symbol, which is what we count; ``dahuffman`` serialises its
  table with pickle and offers no canonical form.
- ``ans``: ``constriction``'s range-ANS coder with one categorical model per stream (symbol counts as
  the model parameters), which gets within a fraction of a percent of the empirical entropy.

Tables: the alphabet is its smallest and largest symbol plus a presence bitmap of the range between
(or a list of 32-bit symbols when shorter); Huffman adds 6 bits of code length per symbol, ANS every
count at the width of the largest count.
- ``zstd``: a general-purpose compressor (``zstandard``, level 19) on the symbols' smallest integer type,
  as a reference column.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

CODERS = ("huffman", "ans", "zstd")
SYMBOL_BITS = 32        # the alphabet's smallest and largest symbol (32-bit integers)
LENGTH_BITS = 6         # a Huffman code length (<= 63)
WIDTH_BITS = 6          # the bit width of the ANS counts that follow


@dataclass(frozen=True)
class CodedStream:
    """A coded stream: payload plus what the decoder needs (alphabet, code lengths or counts)."""

    coder: str
    payload: bytes
    payload_bits: int
    table_bits: int
    count: int
    alphabet: np.ndarray
    table: np.ndarray  # Huffman code lengths or ANS counts, one per alphabet entry; empty for zstd
    dtype: str = "int32"

    @property
    def bits(self) -> int:
        return self.payload_bits + self.table_bits


def as_symbols(values) -> np.ndarray:
    """A 1-D int64 array of integer symbols, or a ValueError naming what is wrong."""
    array = np.asarray(values)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError("symbols must be integers (got non-integer or non-finite floats)")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"symbols must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64).ravel()
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        raise ValueError("symbols must fit in 32-bit integers")
    return array


def alphabet_bits(alphabet: np.ndarray) -> int:
    """The alphabet as smallest and largest symbol plus a presence bit for every value in between,
    or as a plain list of 32-bit symbols when that is shorter."""
    if len(alphabet) == 0:
        return 0
    span = int(alphabet[-1]) - int(alphabet[0]) + 1
    return min(2 * SYMBOL_BITS + span, SYMBOL_BITS * (len(alphabet) + 1))


def count_table_bits(counts: np.ndarray) -> int:
    """ANS model parameters: every count at the width of the largest one, plus that width."""
    return WIDTH_BITS + len(counts) * int(counts.max()).bit_length()


def empirical_entropy_bits(values) -> float:
    """n * H(p) of the symbols' own frequencies: the least an order-0 coder can spend on the payload."""
    symbols = as_symbols(values)
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


# --- canonical Huffman ------------------------------------------------------------------------------
def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol from counts (a single symbol gets length 1)."""
    if len(counts) == 1:
        return np.ones(1, dtype=np.int64)
    heap = [(int(c), i, (i,)) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = np.zeros(len(counts), dtype=np.int64)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for symbol in s1 + s2:
            lengths[symbol] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    if lengths.max() >= 2 ** LENGTH_BITS:
        raise ValueError(f"Huffman code longer than {2 ** LENGTH_BITS - 1} bits; too skewed a distribution for the table format")
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code words (as integers) for code lengths, ordered by (length, alphabet index)."""
    order = np.lexsort((np.arange(len(lengths)), lengths))
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, int(lengths[order[0]])
    for rank, symbol in enumerate(order):
        length = int(lengths[symbol])
        if rank:
            code = (code + 1) << (length - previous)
        codes[symbol] = code
        previous = length
    return codes


def _bits_to_bytes(codes: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Concatenate variable-length code words (MSB first) into bytes."""
    total = int(lengths.sum())
    if total == 0:
        return b"", 0
    ends = np.cumsum(lengths)
    starts = ends - lengths
    width = int(lengths.max())
    shifts = np.arange(width - 1, -1, -1)
    bits = ((codes[:, None] >> shifts[None, :]) & 1).astype(np.uint8)  # right-aligned in `width` bits
    keep = np.arange(width)[None, :] >= (width - lengths)[:, None]
    stream = np.zeros(total, dtype=np.uint8)
    positions = (starts[:, None] + np.arange(width)[None, :] - (width - lengths)[:, None])[keep]
    stream[positions] = bits[keep]
    return np.packbits(stream).tobytes(), total


def _huffman_encode(symbols: np.ndarray) -> CodedStream:
    alphabet, index, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    lengths = huffman_lengths(counts)
    codes = canonical_codes(lengths)
    payload, bits = _bits_to_bytes(codes[index], lengths[index])
    return CodedStream("huffman", payload, bits, alphabet_bits(alphabet) + len(alphabet) * LENGTH_BITS, len(symbols),
                       alphabet, lengths)


def _huffman_decode(stream: CodedStream) -> np.ndarray:
    lengths = stream.table
    codes = canonical_codes(lengths)
    lookup = {(int(length), int(code)): i for i, (length, code) in enumerate(zip(lengths, codes))}
    bits = np.unpackbits(np.frombuffer(stream.payload, dtype=np.uint8))[: stream.payload_bits]
    out = np.empty(stream.count, dtype=np.int64)
    code, length, position = 0, 0, 0
    for bit in bits.tolist():  # decoding is a walk over the bits; the benchmark reports its speed
        code = (code << 1) | bit
        length += 1
        symbol = lookup.get((length, code))
        if symbol is not None:
            out[position] = symbol
            position += 1
            code, length = 0, 0
    if position != stream.count:
        raise ValueError(f"corrupt Huffman stream: decoded {position} of {stream.count} symbols")
    return stream.alphabet[out]


# --- ANS (constriction) -----------------------------------------------------------------------------
def _ans_model(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts.astype(np.float64) / counts.sum(), perfect=False)


def _ans_encode(symbols: np.ndarray) -> CodedStream:
    import constriction

    alphabet, index, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    coder = constriction.stream.stack.AnsCoder()
    if len(alphabet) > 1:  # one symbol: the count says it all
        coder.encode_reverse(index.astype(np.int32), _ans_model(counts))
    words = coder.get_compressed()
    return CodedStream("ans", words.tobytes(), 32 * len(words), alphabet_bits(alphabet) + count_table_bits(counts),
                       len(symbols), alphabet, counts)


def _ans_decode(stream: CodedStream) -> np.ndarray:
    import constriction

    if len(stream.alphabet) == 1:
        return np.full(stream.count, stream.alphabet[0], dtype=np.int64)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream.payload, dtype=np.uint32).copy())
    index = coder.decode(_ans_model(stream.table), stream.count)
    return stream.alphabet[np.asarray(index, dtype=np.int64)]


# --- zstd ---------------------------------------------------------------------------------------------
def _small_dtype(symbols: np.ndarray) -> np.dtype:
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if symbols.size == 0 or (symbols.min() >= info.min and symbols.max() <= info.max):
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _zstd_encode(symbols: np.ndarray) -> CodedStream:
    import zstandard

    dtype = _small_dtype(symbols)
    payload = zstandard.ZstdCompressor(level=19).compress(symbols.astype(dtype).tobytes())
    return CodedStream("zstd", payload, 8 * len(payload), 8, len(symbols), np.empty(0, dtype=np.int64),
                       np.empty(0, dtype=np.int64), dtype.name)


def _zstd_decode(stream: CodedStream) -> np.ndarray:
    import zstandard

    raw = zstandard.ZstdDecompressor().decompress(stream.payload)
    return np.frombuffer(raw, dtype=np.dtype(stream.dtype)).astype(np.int64)


_ENCODERS = {"huffman": _huffman_encode, "ans": _ans_encode, "zstd": _zstd_encode}
_DECODERS = {"huffman": _huffman_decode, "ans": _ans_decode, "zstd": _zstd_decode}


def encode(values, coder: str = "ans") -> CodedStream:
    """Code integer symbols with ``coder`` (huffman | ans | zstd)."""
    if coder not in _ENCODERS:
        raise ValueError(f"coder {coder!r} is not allowed; choose one of {list(CODERS)}")
    symbols = as_symbols(values)
    if symbols.size == 0:
        return CodedStream(coder, b"", 0, 0, 0, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    return _ENCODERS[coder](symbols)


def decode(stream: CodedStream) -> np.ndarray:
    """The symbols ``stream`` was made from (int64)."""
    if stream.count == 0:
        return np.empty(0, dtype=np.int64)
    return _DECODERS[stream.coder](stream)


# --- sparsity pattern -----------------------------------------------------------------------------------
def relative_indices(mask, max_gap: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression's relative indices of a flattened mask's kept entries.

    Returns (gaps, kept): ``gaps[k]`` is the number of skipped entries before the k-th stored entry, at
    most ``max_gap``; a longer run stores a filler entry (a pruned position, ``kept`` False) after
    ``max_gap`` skips. The coded weights list one code per stored entry (fillers code zero).
    """
    if max_gap < 1:
        raise ValueError(f"max_gap must be >= 1, got {max_gap}")
    flat = np.asarray(mask, dtype=bool).ravel()
    positions = np.flatnonzero(flat)
    gaps, kept, previous = [], [], -1
    for position in positions.tolist():
        skipped = position - previous - 1
        while skipped > max_gap:
            gaps.append(max_gap)
            kept.append(False)
            skipped -= max_gap + 1
        gaps.append(skipped)
        kept.append(True)
        previous = position
    return np.asarray(gaps, dtype=np.int64), np.asarray(kept, dtype=bool)


def positions_from_gaps(gaps) -> np.ndarray:
    """Flat positions of the stored entries (fillers included) from their relative indices."""
    return np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1
