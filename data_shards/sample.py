"""One CT sample: what a writer receives and what a reader gets back."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import codecs
from .format import MASK_EXT, META_EXT, REPORT_EXT, VOLUME_EXT, check_key


@dataclass
class Sample:
    key: str
    volume: np.ndarray  # int16 HU, (D, H, W)
    report: str
    meta: dict = field(default_factory=dict)  # spacing, orientation, patient_id, study_id, source, ...
    mask: Optional[np.ndarray] = None  # uint8, same shape
    split: str = "train"

    def encode(self, codec: str) -> list[tuple[str, bytes]]:
        """Validate and turn into tar members. Metadata gains shape/dtype/codec."""
        check_key(self.key)
        if self.volume.dtype != np.int16 or self.volume.ndim != 3:
            raise ValueError(f"{self.key}: volume must be 3D int16, got {self.volume.dtype} {self.volume.shape}")
        if not self.report or not self.report.strip():
            raise ValueError(f"{self.key}: empty report")
        meta = dict(self.meta, key=self.key, shape=list(self.volume.shape), dtype="int16", codec=codec,
                    split=self.split)
        members = [(VOLUME_EXT[codec], codecs.encode(self.volume, codec))]
        if self.mask is not None:
            if self.mask.shape != self.volume.shape or self.mask.dtype != np.uint8:
                raise ValueError(f"{self.key}: mask must be uint8 with the volume's shape")
            members.append((MASK_EXT[codec], codecs.encode(self.mask, codec)))
            meta["mask_dtype"] = "uint8"
        members.append((META_EXT, json.dumps(meta, sort_keys=True).encode()))
        members.append((REPORT_EXT, self.report.encode("utf-8")))
        return members


def decode_members(key: str, members: dict[str, bytes], decode_mask: bool = True) -> Sample:
    """Tar members of one sample -> Sample. Raises ValueError naming the sample on any problem."""
    if META_EXT not in members:
        raise ValueError(f"sample {key}: no metadata ({key}.{META_EXT})")
    try:
        meta = json.loads(bytes(members[META_EXT]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"sample {key}: metadata is not valid JSON: {e}") from e
    codec = meta.get("codec")
    if codec not in VOLUME_EXT:
        raise ValueError(f"sample {key}: unknown codec {codec!r} in metadata")
    if VOLUME_EXT[codec] not in members:
        raise ValueError(f"sample {key}: no volume ({key}.{VOLUME_EXT[codec]})")
    if REPORT_EXT not in members:
        raise ValueError(f"sample {key}: no report ({key}.{REPORT_EXT})")
    report = bytes(members[REPORT_EXT]).decode("utf-8", errors="strict")
    if not report.strip():
        raise ValueError(f"sample {key}: empty report")
    shape = tuple(meta["shape"])
    try:
        vol = codecs.decode(members[VOLUME_EXT[codec]], codec, shape, meta.get("dtype", "int16"))
        mask = None
        if decode_mask and MASK_EXT[codec] in members:
            mask = codecs.decode(members[MASK_EXT[codec]], codec, shape, "uint8")
    except codecs.CodecError as e:
        raise ValueError(f"sample {key}: {e}") from e
    return Sample(key=key, volume=vol, report=report, meta=meta, mask=mask, split=meta.get("split", ""))
