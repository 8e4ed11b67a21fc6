"""Independent references for the packed format's tests: numpy decodings of the
documented storage layouts (written from the docs of razor_jax.codecs, not its code)
and long activation-like groups that exercise the sampled threshold search."""
import jax.numpy as jnp
import numpy as np

from razor_jax import codecs


def long_group(kind: str, seed: int, n: int = 1 << 15):
  """Two groups long enough for the sampled bracket, in shapes that defeat it or not."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, n)).astype(np.float32)
  if kind == "ties":  # the threshold lies inside a run of equal values
    x = np.round(x * 4) / 4
  elif kind == "zeros":  # fewer non-zeros than K: the threshold is 0
    x[:, rng.random(n) < 0.95] = 0
  elif kind == "aliased":  # large values exactly where the sample looks (runs of 16, every 31)
    x = x * 1e-3
    sampled = (np.arange(n) // 16) % 31 == 0
    x[:, sampled] = 10 + rng.random((2, sampled.sum()))
  elif kind == "wide":  # magnitudes over 60 binades
    x = x * np.exp2(rng.uniform(-30, 30, (2, n))).astype(np.float32)
  elif kind == "constant":
    x = np.full((2, n), -1.5, np.float32)
  return jnp.asarray(x)


def bitmask_to_mask(words, n):
  """Numpy decoding of the documented layout (codecs.bitmask), to check it independently."""
  lanes = 32 if n % 256 == 0 else 4
  e = np.arange(n)
  byte = (e // (8 * lanes)) * lanes + e % lanes
  bit = 8 * (byte % 4) + (e // lanes) % 8  # words are little-endian groups of 4 bytes
  return ((np.asarray(words)[:, byte // 4] >> bit.astype(np.uint32)) & 1).astype(bool)


def ef_to_bitmask(code, n, k):
  """Numpy decoding of the Elias-Fano code (codecs.ef_layout) into bitmask words."""
  low, upper_words, _ = codecs.ef_layout(n, k)
  code = np.asarray(code)
  words = np.zeros((code.shape[0], codecs.bitmask_words(n)), np.uint32)
  for row, c in enumerate(code):
    upper = np.unpackbits(c[:upper_words].view(np.uint8), bitorder="little")
    at = np.flatnonzero(upper)
    assert len(at) == k
    planes = np.unpackbits(c[upper_words:].view(np.uint8), bitorder="little")
    per = -(-k // 8)
    planes = planes[:8 * per * low].reshape(low, per, 8)  # plane, byte, bit of byte
    j = np.arange(k)
    lows = sum(planes[p, j % per, j // per].astype(np.int64) << p for p in range(low))
    index = ((at - j) << low) | lows
    np.bitwise_or.at(words[row], index >> 5, (1 << (index & 31)).astype(np.uint32))
  return words
