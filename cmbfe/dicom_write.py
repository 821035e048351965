"""Writing a :class:`cmbfe.volume.Volume` as a DICOM MR series: the synthetic cohort's on-disk form.

``cmbfe synth`` writes each patient with :func:`write_dicom_series`; the readers are in :mod:`cmbfe.io`
(:func:`cmbfe.io.read_dicom_series` reads what this writes: same voxel grid, affine and values). Files are
deterministic (UIDs derived from a seed) and carry no PHI: only synthetic identifiers are written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from cmbfe.errors import InputError
from cmbfe.volume import Volume

# Tags that could identify a patient; never copied into any output written by cmbfe.
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientAddress",
    "OtherPatientIDs", "OtherPatientNames", "PatientTelephoneNumbers", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "AccessionNumber", "StationName", "DeviceSerialNumber",
)
GAMMA_MHZ_T = 42.577478  # proton gyromagnetic ratio / 2 pi (ImagingFrequency = GAMMA * field)


def _pixels(vol: Volume) -> tuple[np.ndarray, float, float]:
    """``(uint16 pixels [slice, row, col], RescaleSlope, RescaleIntercept)``: the values as they are when
    integral and within 0..65535, else scaled linearly to 0..4095."""
    data = np.asarray(vol.data)
    if not np.isfinite(data).all():
        raise InputError(f"{vol.source or vol.patient_id}: volume has NaN/inf values")
    integral = np.issubdtype(data.dtype, np.integer) or np.array_equal(data, np.round(data))
    if integral and data.min() >= 0 and data.max() <= 65535:
        return data.astype(np.uint16), 1.0, 0.0
    lo, hi = float(data.min()), float(data.max())
    slope = (hi - lo) / 4095.0 if hi > lo else 1.0
    return np.round((data - lo) / slope).astype(np.uint16), slope, lo


def _new_file(fn: Path, sop_uid: str) -> FileDataset:
    """An empty MR Image Storage file (explicit VR little endian) with its SOP identity."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(fn), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    return ds


def _set_identity(ds: FileDataset, patient_id: str, uids: dict[str, str], description: str, k: int) -> None:
    """Patient (synthetic id only), study, series and instance tags of slice ``k`` (0-based)."""
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate = "20000101"
    ds.StudyTime = "000000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "HEAD"
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "cmbfe synthetic"
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.ContentDate = "20000101"
    ds.ContentTime = "000000"
    ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]


def _set_geometry(ds: FileDataset, vol: Volume, k: int) -> None:
    """Pixel spacing, orientation and position of slice ``k`` from the volume's affine (LPS mm)."""
    aff = np.asarray(vol.affine, dtype=float)
    dz, dy, dx = vol.spacing_mm
    row_cos = aff[:3, 0] / dx
    col_cos = aff[:3, 1] / dy
    ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
    ipp = aff @ np.array([0.0, 0.0, float(k), 1.0])
    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp[:3]]
    normal = np.cross(row_cos, col_cos)
    ds.SliceLocation = f"{float(np.dot(ipp[:3], normal)):.4f}"
    ds.SliceThickness = f"{dz:.6g}"
    ds.SpacingBetweenSlices = f"{dz:.6g}"


def _set_sequence(ds: FileDataset, te_ms: float, tr_ms: float, flip_deg: float, field_t: float) -> None:
    """The 3D spoiled gradient-echo acquisition tags (TE, TR in ms; flip angle in degrees; field in T)."""
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SP"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = f"{tr_ms:g}"
    ds.EchoTime = f"{te_ms:g}"
    ds.EchoTrainLength = 1
    ds.FlipAngle = f"{flip_deg:g}"
    ds.MagneticFieldStrength = f"{field_t:g}"
    ds.ImagingFrequency = f"{GAMMA_MHZ_T * field_t:.4f}"
    ds.ImagedNucleus = "1H"


def write_dicom_series(
    vol: Volume,
    out_dir: Path,
    *,
    uid_seed: str,
    series_description: str = "SWI magnitude (synthetic, cmbfe)",
    echo_time_ms: float = 20.0,
    field_t: float = 3.0,
    repetition_time_ms: float = 28.0,
    flip_angle_deg: float = 15.0,
) -> list[Path]:
    """Write ``vol`` as an MR Image Storage series, one file per slice (``IM_0001.dcm`` ...).

    Pixel data are stored as uint16 without rescale when ``vol.data`` is integral and within
    0..65535, else scaled linearly to 0..4095 with RescaleSlope/Intercept recording the mapping.
    UIDs are derived deterministically from ``uid_seed`` (same seed -> byte-identical files). Only
    synthetic identifiers are written: PatientID/PatientName = ``vol.patient_id``, no other PHI.
    Files are written to ``out_dir`` directly; callers make the folder atomic (see utils.atomic_path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pix, slope, intercept = _pixels(vol)
    uids = {name: generate_uid(entropy_srcs=[uid_seed, name]) for name in ("study", "series", "frame")}
    paths = []
    for k in range(pix.shape[0]):
        fn = out_dir / f"IM_{k + 1:04d}.dcm"
        ds = _new_file(fn, generate_uid(entropy_srcs=[uid_seed, "sop", str(k)]))
        _set_identity(ds, vol.patient_id, uids, series_description, k)
        _set_geometry(ds, vol, k)
        _set_sequence(ds, echo_time_ms, repetition_time_ms, flip_angle_deg, field_t)
        ds.set_pixel_data(np.ascontiguousarray(pix[k]), photometric_interpretation="MONOCHROME2",
                          bits_stored=16, generate_instance_uid=False)
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope = f"{slope:.8g}"
            ds.RescaleIntercept = f"{intercept:.8g}"
            ds.RescaleType = "US"
        ds.save_as(fn, enforce_file_format=True)
        paths.append(fn)
    return paths
