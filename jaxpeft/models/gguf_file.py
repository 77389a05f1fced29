"""Reads a GGUF file: its metadata, and its tensors dequantised to float32 numpy arrays.

GGUF (llama.cpp's format, spec: ggml `docs/gguf.md`) is a header, key/value metadata, tensor
descriptions, then the aligned tensor data. This reader parses the header and metadata itself
(`gguf.GGUFReader` builds a Python object per array element, over 30 s for a 262k-token
vocabulary) and memory-maps the data; dequantisation is the `gguf` package's
`gguf.quants.dequantize` (needed only for quantised tensors). Every read is bounds-checked, so a
truncated file or one that is not GGUF gives a one-line error instead of garbage.
"""

import dataclasses
import pathlib
import struct
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9
# Unquantised ggml tensor types -> numpy dtype (F32, F16, F64; BF16 is dequantised by `gguf`).
_PLAIN_TENSORS = {0: np.float32, 1: np.float16, 28: np.float64}


class GGUFError(ValueError):
  """The file is not a readable GGUF file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """A tensor's name, ggml type, shape in numpy order (reversed ggml dims) and byte range."""

  name: str
  ggml_type: int
  shape: tuple[int, ...]
  offset: int
  n_bytes: int


class GGUFFile:
  """An open GGUF file: `metadata` (key -> value), `tensors` (name -> `TensorInfo`), `read`."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"GGUF file {self.path} does not exist.")
    self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
    self._pos = 0
    try:
      self._parse()
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
      raise GGUFError(
          f"{self.path} could not be read as GGUF ({e}); it is truncated or not a GGUF file."
          " Download or assemble it again."
      ) from e

  def _take(self, n: int) -> bytes:
    if self._pos + n > len(self._data):
      raise GGUFError(
          f"{self.path} is truncated: it ends at byte {len(self._data)} inside its header."
          " Download or assemble it again."
      )
    out = self._data[self._pos : self._pos + n].tobytes()
    self._pos += n
    return out

  def _scalar(self, fmt: str) -> Any:
    return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

  def _string(self) -> str:
    return self._take(self._scalar("<Q")).decode("utf-8")

  def _value(self, kind: int) -> Any:
    if kind == _STRING:
      return self._string()
    if kind == _ARRAY:
      item_kind, count = self._scalar("<I"), self._scalar("<Q")
      if item_kind in _NUMPY:
        dtype = np.dtype(_NUMPY[item_kind])
        return np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype)
      return [self._value(item_kind) for _ in range(count)]
    if kind not in _SCALARS:
      raise GGUFError(f"{self.path}: unknown metadata value type {kind}; not a GGUF file this reader knows.")
    return self._scalar(_SCALARS[kind])

  def _parse(self) -> None:
    from gguf.constants import GGML_QUANT_SIZES  # (block size, bytes per block) per ggml type.

    if self._take(4) != _MAGIC:
      raise GGUFError(f"{self.path} is not a GGUF file (it does not start with b'GGUF').")
    version = self._scalar("<I")
    if version not in (2, 3):
      raise GGUFError(f"{self.path} is GGUF version {version}; this reader reads versions 2 and 3.")
    n_tensors, n_values = self._scalar("<Q"), self._scalar("<Q")
    self.metadata: dict[str, Any] = {}
    for _ in range(n_values):
      key = self._string()
      self.metadata[key] = self._value(self._scalar("<I"))
    infos = []
    for _ in range(n_tensors):
      name = self._string()
      dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
      ggml_type, offset = self._scalar("<I"), self._scalar("<Q")
      infos.append((name, dims, ggml_type, offset))
    alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    start = -(-self._pos // alignment) * alignment
    self.tensors: dict[str, TensorInfo] = {}
    for name, dims, ggml_type, offset in infos:
      if ggml_type not in GGML_QUANT_SIZES:
        raise GGUFError(f"{self.path}: tensor {name} has unknown ggml type {ggml_type}.")
      block, block_bytes = GGML_QUANT_SIZES[ggml_type]
      self.tensors[name] = TensorInfo(
          name, ggml_type, tuple(reversed(dims)), start + offset, int(np.prod(dims)) // block * block_bytes
      )
    short = [t.name for t in self.tensors.values() if t.offset + t.n_bytes > len(self._data)]
    if short:
      raise GGUFError(
          f"{self.path} is truncated: {len(short)} tensor(s) end past its {len(self._data)} bytes"
          f" (first: {short[0]}). Download or assemble it again."
      )

  def read(self, name: str) -> np.ndarray:
    """Tensor `name` as a float32 array in numpy order (for a Linear weight: (out, in))."""
    info = self.tensors[name]
    raw = self._data[info.offset : info.offset + info.n_bytes]
    if info.ggml_type in _PLAIN_TENSORS:
      return raw.view(_PLAIN_TENSORS[info.ggml_type]).reshape(info.shape).astype(np.float32)
    import gguf  # Only quantised tensors need the `gguf` package.

    rows = raw.reshape(-1, info.n_bytes // max(1, int(np.prod(info.shape[:-1]))))
    return (
        gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(info.ggml_type))
        .reshape(info.shape)
        .astype(np.float32)
    )
