"""CMB-specific I/O: DICOM series writing (synthetic cohort) and readers for real data.

All readers return :class:`cmbfe.volume.Volume` (data ``[slice, row, col]`` float32, affine
voxel (col, row, slice) -> LPS mm). Bad input raises :class:`InputError` naming the file and problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid

from cmbfe.volume import Volume


class InputError(ValueError):
    """Input data is unusable; the message names the file and what is wrong."""


# Tags that could identify a patient; never copied into any output written by cmbfe.
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientAddress",
    "OtherPatientIDs", "OtherPatientNames", "PatientTelephoneNumbers", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "AccessionNumber", "StationName", "DeviceSerialNumber",
)


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
    data = np.asarray(vol.data)
    if not np.isfinite(data).all():
        raise InputError(f"{vol.source or vol.patient_id}: volume has NaN/inf values")
    integral = np.issubdtype(data.dtype, np.integer) or np.array_equal(data, np.round(data))
    if integral and data.min() >= 0 and data.max() <= 65535:
        pix = data.astype(np.uint16)
        slope, intercept = 1.0, 0.0
    else:
        lo, hi = float(data.min()), float(data.max())
        slope = (hi - lo) / 4095.0 if hi > lo else 1.0
        intercept = lo
        pix = np.round((data - lo) / slope).astype(np.uint16)
    aff = np.asarray(vol.affine, dtype=float)
    dz, dy, dx = vol.spacing_mm
    row_cos = aff[:3, 0] / dx
    col_cos = aff[:3, 1] / dy
    study_uid = generate_uid(entropy_srcs=[uid_seed, "study"])
    series_uid = generate_uid(entropy_srcs=[uid_seed, "series"])
    frame_uid = generate_uid(entropy_srcs=[uid_seed, "frame"])
    paths = []
    for k in range(pix.shape[0]):
        sop_uid = generate_uid(entropy_srcs=[uid_seed, "sop", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        fn = out_dir / f"IM_{k + 1:04d}.dcm"
        ds = FileDataset(str(fn), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.PatientName = vol.patient_id
        ds.PatientID = vol.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20000101"
        ds.StudyTime = "000000"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = series_description
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "HEAD"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "cmbfe synthetic"
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = "20000101"
        ds.ContentTime = "000000"
        ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
        ipp = aff @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp[:3]]
        normal = np.cross(row_cos, col_cos)
        ds.SliceLocation = f"{float(np.dot(ipp[:3], normal)):.4f}"
        ds.SliceThickness = f"{dz:.6g}"
        ds.SpacingBetweenSlices = f"{dz:.6g}"
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = f"{repetition_time_ms:g}"
        ds.EchoTime = f"{echo_time_ms:g}"
        ds.EchoTrainLength = 1
        ds.FlipAngle = f"{flip_angle_deg:g}"
        ds.MagneticFieldStrength = f"{field_t:g}"
        ds.ImagingFrequency = f"{42.577478 * field_t:.4f}"
        ds.ImagedNucleus = "1H"
        ds.set_pixel_data(np.ascontiguousarray(pix[k]), photometric_interpretation="MONOCHROME2", bits_stored=16)
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope = f"{slope:.8g}"
            ds.RescaleIntercept = f"{intercept:.8g}"
            ds.RescaleType = "US"
        ds.save_as(fn, enforce_file_format=True)
        paths.append(fn)
    return paths


__all__ = ["InputError", "PHI_KEYWORDS", "write_dicom_series", "pydicom"]
