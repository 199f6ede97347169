"""Deterministic identity of result objects: UIDs and file names.

Every UID the node gives a result object is derived from what the result *is*:
the source study, the bundle that produced it (name, version, weights hash),
the kind of object, the source image it belongs to, and the result version.
Building the same results twice gives the same UIDs, so sending them again
replaces the stored objects instead of duplicating them. A re-run of a study
(late images, another model) uses a higher result version and therefore new
UIDs; its SR points to the one it supersedes.

A UID is ``2.25.<n>`` (ISO/IEC 9834-8) where ``n`` is a name-based UUID: the
first 128 bits of SHA-256 over the parts, with the UUID version bits set to 8
(custom) and the RFC 4122 variant bits. At most 44 characters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from dicom_node.errors import EncodingError

#: Namespace string hashed in front of every part list (changing it changes every UID).
_NAMESPACE = "msk-dicom-node/results/v1"


def _digest(parts: tuple[str, ...]) -> bytes:
    h = hashlib.sha256()
    h.update(_NAMESPACE.encode())
    for p in parts:
        b = str(p).encode("utf-8")
        # length-prefixed so that ("ab", "c") and ("a", "bc") differ
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return h.digest()


def derive_uid(*parts: str | int) -> str:
    """``2.25.<uuid as integer>`` from the SHA-256 of ``parts`` (UUID version 8, RFC 4122 variant)."""
    if not parts:
        raise EncodingError("a derived UID needs at least one part")
    b = bytearray(_digest(tuple(str(p) for p in parts))[:16])
    b[6] = (b[6] & 0x0F) | 0x80  # version 8: custom/name-based
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return "2.25." + str(int.from_bytes(bytes(b), "big"))


def derive_id(*parts: str | int, length: int = 24) -> str:
    """A hex identifier (for file names) from the same hash as :func:`derive_uid`."""
    return _digest(tuple(str(p) for p in parts)).hex()[:length]


@dataclass(frozen=True)
class ResultIdentity:
    """Identity of one set of result objects for one study.

    ``result_version`` starts at 1; a re-run of the same study gets a higher one.
    """

    study_uid: str
    bundle_name: str
    bundle_version: str
    weights_sha256: str
    result_version: int = 1

    def __post_init__(self) -> None:
        if not self.study_uid:
            raise EncodingError("the source study has no StudyInstanceUID")
        if not self.weights_sha256:
            raise EncodingError("the model has no weights hash: result UIDs cannot be derived")
        if not isinstance(self.result_version, int) or self.result_version < 1:
            raise EncodingError(f"result_version must be an integer >= 1, got {self.result_version!r}")

    # -- the parts every result UID shares --------------------------------------------
    def _parts(self, kind: str, *extra: str | int, versioned: bool = True) -> tuple[str | int, ...]:
        base = (self.study_uid, self.bundle_name, self.bundle_version, self.weights_sha256, kind)
        return base + tuple(extra) + ((f"v{self.result_version}",) if versioned else ())

    def uid(self, kind: str, *extra: str | int, versioned: bool = True) -> str:
        return derive_uid(*self._parts(kind, *extra, versioned=versioned))

    def file_id(self, kind: str, *extra: str | int) -> str:
        return derive_id(*self._parts(kind, *extra))

    # -- named UIDs ---------------------------------------------------------------------
    @property
    def sr_series_uid(self) -> str:
        return self.uid("sr-series")

    @property
    def sr_instance_uid(self) -> str:
        return self.uid("sr")

    @property
    def sc_series_uid(self) -> str:
        return self.uid("sc-series")

    def heatmap_uid(self, source_sop_instance_uid: str) -> str:
        return self.uid("heatmap", source_sop_instance_uid)

    def pr_uid(self, source_sop_instance_uid: str) -> str:
        """SOP Instance UID of the presentation state made for one source image."""
        return self.uid("gsps", source_sop_instance_uid)

    @property
    def pr_series_uid(self) -> str:
        return self.uid("pr-series")

    @property
    def summary_uid(self) -> str:
        return self.uid("summary")

    def tracking_uid(self, source_sop_instance_uid: str, what: str) -> str:
        """Tracking Unique Identifier of a finding: stable across result versions of the same bundle."""
        return self.uid("tracking", source_sop_instance_uid, what, versioned=False)

    @property
    def device_uid(self) -> str:
        """Device UID of the algorithm: tied to the bundle's weights only (same for every study)."""
        return device_uid(self.bundle_name, self.weights_sha256)

    @property
    def sr_series_number(self) -> int:
        return 9100 + self.result_version

    @property
    def sc_series_number(self) -> int:
        return 9200 + self.result_version

    @property
    def pr_series_number(self) -> int:
        return 9300 + self.result_version


def device_uid(bundle_name: str, weights_sha256: str) -> str:
    """The Device UID of a bundle: derived from its name and weights hash."""
    return derive_uid("device", bundle_name, weights_sha256)


def rejection_note_uids(superseding_sr_uid: str, destination: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the rejection note sent to ``destination`` when the
    result version whose SR is ``superseding_sr_uid`` supersedes what it holds. The SR's UID carries
    the study, the bundle and the version; the destination is a part because each destination is told
    about exactly the objects it received."""
    return (derive_uid("rejection-series", superseding_sr_uid, destination),
            derive_uid("rejection", superseding_sr_uid, destination))
