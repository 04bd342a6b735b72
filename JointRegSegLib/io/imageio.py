"""Reading, validating and atomically writing volumes. Everything is SimpleITK (LPS)."""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import InputImageError, JointRegSegError

# Refuse volumes whose float32 copies alone would exceed this many voxels (about 3 GB per copy).
MAX_VOXELS = 768 * 1024 * 1024
_CHUNK = 16 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
# NIfTI datatype code -> numpy dtype of one stored value (floats only matter for the NaN check)
_NIFTI_FLOATS = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}


def read_image(path: str | os.PathLike, role: str = "image") -> sitk.Image:
    """Read any file SimpleITK reads, or a folder holding one DICOM series.

    Files whose voxel data end early (a truncated download or copy) and NIfTI files holding NaN or
    infinite values (SimpleITK reads those as 0) raise InputImageError instead of being read as zeros.
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{role}: file not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputImageError(f"{role}: folder {path} holds no DICOM series")
            if len(series) > 1:
                raise InputImageError(
                    f"{role}: folder {path} holds {len(series)} DICOM series; pass a folder with one series")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            _check_nifti(path, role)
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputImageError(f"{role}: cannot read {path}: {_itk_reason(err)}") from None
    if not path.is_dir():
        _check_data_length(path, image, role)
    return image


def read_image_information(path: str | os.PathLike, role: str = "image") -> dict:
    """Size, pixel type and spacing from the file header, without reading the voxels (None for DICOM folders)."""
    path = Path(path)
    if path.is_dir() or not path.is_file():
        return {}
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputImageError(f"{role}: cannot read {path}: {_itk_reason(err)}") from None
    return {"size": tuple(reader.GetSize()), "components": reader.GetNumberOfComponents(),
            "bytes_per_value": np.dtype(_sitk_numpy_type(reader.GetPixelID())).itemsize}


def _itk_reason(err: RuntimeError) -> str:
    text = str(err).strip()
    if "data not read completely" in text or "fread got only" in text or "expected" in text and "received" in text:
        return "the file is truncated (its voxel data end early)"
    if "Reason: No such file or directory" in text and "cannot be read" in text:
        return "the file is damaged or truncated (ITK could not read its voxel data)"
    if "Unable to determine ImageIO reader" in text:
        return "not an image format SimpleITK can read (unknown or unsupported file type)"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown reason"


def _sitk_numpy_type(pixel_id: int):
    name = sitk.GetPixelIDValueAsString(pixel_id)
    for key, dtype in (("64-bit float", np.float64), ("32-bit float", np.float32), ("64-bit signed", np.int64),
                       ("64-bit unsigned", np.uint64), ("32-bit signed", np.int32), ("32-bit unsigned", np.uint32),
                       ("16-bit signed", np.int16), ("16-bit unsigned", np.uint16), ("8-bit signed", np.int8),
                       ("8-bit unsigned", np.uint8)):
        if key in name:
            return dtype
    return np.float32


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as handle:
        magic = handle.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def _stream_length(path: Path, skip: int, role: str, on_chunk=None) -> int:
    """Bytes after `skip` in a (possibly gzip-compressed) file; a broken gzip stream is a truncation."""
    total = 0
    try:
        with _open_maybe_gzip(path) as handle:
            if skip:
                skipped = len(handle.read(skip))
                if skipped < skip:
                    return -1
            while True:
                block = handle.read(_CHUNK)
                if not block:
                    break
                if on_chunk is not None:
                    on_chunk(total, block)
                total += len(block)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as err:
        raise InputImageError(f"{role}: cannot read {path}: the file is truncated or damaged "
                              f"(compressed data end early: {err})") from None
    return total


def _nifti_header(path: Path):
    """(header dict, data file) for NIfTI-1/-2 and Analyze files; None when `path` is not one."""
    name = path.name.lower()
    if not (name.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz"))):
        return None
    header_path = path
    if name.endswith((".img", ".img.gz")):
        header_path = path.with_name(path.name[: -len(".img.gz") if name.endswith(".gz") else -len(".img")] + ".hdr")
        if not header_path.exists():
            header_path = header_path.with_name(header_path.name + ".gz")
    with _open_maybe_gzip(header_path) as handle:
        raw = handle.read(540)
    if len(raw) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", raw[:4])[0]
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", raw[70:74])
            vox_offset = struct.unpack(endian + "f", raw[108:112])[0]
            magic = raw[344:348]
            break
        if sizeof_hdr == 540 and len(raw) >= 540:
            datatype, bitpix = struct.unpack(endian + "2h", raw[12:16])
            dims = struct.unpack(endian + "8q", raw[16:80])
            vox_offset = struct.unpack(endian + "q", raw[168:176])[0]
            magic = raw[4:8]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    single_file = magic[:3] in (b"n+1", b"n+2")
    if single_file:
        data_path = header_path
    else:  # header + image pair (NIfTI "ni1" or Analyze 7.5)
        stem = header_path.name[: -len(".hdr.gz")] if header_path.name.lower().endswith(".gz") else header_path.stem
        candidates = [header_path.with_name(stem + ext) for ext in (".img", ".img.gz", ".IMG")]
        data_path = next((c for c in candidates if c.exists()), candidates[0])
        vox_offset = max(vox_offset, 0)
    count = int(np.prod([max(int(d), 1) for d in dims[1: dims[0] + 1]], dtype=np.int64))
    return {"count": count, "datatype": int(datatype), "bitpix": int(bitpix), "offset": int(vox_offset),
            "endian": endian}, data_path


def _check_nifti(path: Path, role: str) -> None:
    """Exact data-length and NaN checks for NIfTI (SimpleITK pads a short file with zeros, reads NaN as 0)."""
    try:
        parsed = _nifti_header(path)
    except (OSError, EOFError, zlib.error, struct.error):
        return  # not parseable as NIfTI here: leave the verdict to SimpleITK
    if parsed is None:
        return
    info, data_path = parsed
    if not data_path.exists():
        raise InputImageError(f"{role}: cannot read {path}: its voxel data file {data_path.name} is missing")
    expected = info["count"] * max(info["bitpix"], 8) // 8
    dtype = _NIFTI_FLOATS.get(info["datatype"])
    non_finite = [0]
    tail = bytearray()

    def scan(_offset, block):
        if dtype is None:
            return
        item = np.dtype(info["endian"] + dtype).itemsize
        data = bytes(tail) + block
        usable = len(data) - len(data) % item
        values = np.frombuffer(data[:usable], dtype=info["endian"] + dtype)
        non_finite[0] += int(np.count_nonzero(~np.isfinite(values)))
        tail[:] = data[usable:]

    length = _stream_length(data_path, info["offset"], role, scan)
    if length < expected:
        have = max(length, 0)
        raise InputImageError(f"{role}: cannot read {path}: the file is truncated (it holds {have} of the "
                              f"{expected} bytes of voxel data its header describes, {100 * have / expected:.0f}%)")
    if non_finite[0]:
        raise InputImageError(f"{role}: volume {path} contains {non_finite[0]} NaN or infinite voxels")


# formats whose voxel data are compressed inside the file (so its size says nothing about truncation) and
# whose readers check their own data: PNG, JPEG, TIFF (strip byte counts), MINC (HDF5)
_SELF_CHECKED = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".mnc", ".mnc2")


def _check_data_length(path: Path, image: sitk.Image, role: str) -> None:
    """Other single-file formats: the file (decompressed) must at least hold every voxel's bytes."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".hdr", ".img", ".img.gz", ".hdr.gz", ".nrrd", ".nhdr", ".mha", ".mhd",
                      ".dcm")):
        return  # checked exactly above (NIfTI) or by SimpleITK itself (NRRD, MetaImage, DICOM)
    if name.endswith(_SELF_CHECKED) or image.GetDimension() < 3:
        return  # compressed by the format; a 2D image is refused by validate_volume ("expected a 3D volume")
    needed = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * \
        np.dtype(_sitk_numpy_type(image.GetPixelID())).itemsize
    with open(path, "rb") as handle:
        compressed = handle.read(2) == _GZIP_MAGIC
    have = _stream_length(path, 0, role) if compressed else path.stat().st_size
    if have < needed:
        raise InputImageError(f"{role}: cannot read {path}: the file is truncated ({have} bytes cannot hold the "
                              f"{needed} bytes of voxel data of a {'x'.join(map(str, image.GetSize()))} volume)")


def validate_volume(image: sitk.Image, role: str) -> sitk.Image:
    """Check that `image` is a usable scalar 3D volume; return it as float32 with its geometry."""
    if not isinstance(image, sitk.Image):
        raise InputImageError(f"{role}: expected a SimpleITK image, got {type(image).__name__}")
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputImageError(f"{role}: expected a 3D volume, got a {dim}D image of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"{role}: expected a scalar volume, got {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(a vector, RGB or time-series image)")
    size = image.GetSize()
    if min(size) < 2:
        raise InputImageError(f"{role}: volume of size {size} is a single slice; a 3D volume is needed")
    if int(np.prod(size)) > MAX_VOXELS:
        raise InputImageError(f"{role}: volume of size {size} is too large for memory "
                              f"(limit {MAX_VOXELS} voxels); crop or downsample it first")
    spacing = np.array(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputImageError(f"{role}: invalid voxel spacing {tuple(spacing)}")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise InputImageError(f"{role}: direction matrix is not orthonormal: {direction.tolist()}")
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    bad, low, high = 0, np.inf, -np.inf
    for start in range(0, values.shape[0], max(1, _CHUNK // max(values[0].size, 1))):
        block = values[start: start + max(1, _CHUNK // max(values[0].size, 1))]
        finite = np.isfinite(block)
        if not finite.all():
            bad += int(block.size - np.count_nonzero(finite))
            continue
        low, high = min(low, float(block.min())), max(high, float(block.max()))
    if bad:
        raise InputImageError(f"{role}: volume contains {bad} NaN or infinite voxels")
    if low == high:
        raise InputImageError(f"{role}: volume is empty (every voxel equals {low})")
    return image


def label_image_like(labels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(labels.astype(np.uint8, copy=False))
    image.CopyInformation(reference)
    return image


# ---- memory -------------------------------------------------------------------------------------------

def available_memory_bytes() -> int | None:
    """Memory the system can still give this process (MemAvailable, capped by a cgroup limit), or None."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text(encoding="ascii").strip()
            usage = int(Path(usage_file).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            headroom = int(limit) - usage
            available = headroom if available is None else min(available, headroom)
    return available


def estimate_run_memory_bytes(fixed_voxels: int, moving_voxels: int, working_voxels: int,
                              num_classes: int) -> int:
    """Peak memory of `register_and_segment` + writing its outputs, from the image sizes alone.

    Measured on this implementation (fixed-grid work runs in slabs, the written field is float32):
    per fixed voxel about 4 (input) + 4 (float32 copy) + 4 (warped) + 4 (det J) + 3 (label maps)
    + 12 (float32 displacement written at the end) + 12 (the NIfTI writer's reordered copy) bytes,
    per moving voxel about 4 + 4 + 2 bytes, the working grid's tensors, and the Python/torch base.
    """
    base = 450 * 1024 ** 2
    working = working_voxels * (4 * (6 + 2 * num_classes) + 8 * 3 * 6)
    return int(base + fixed_voxels * 43 + moving_voxels * 10 + working)


def check_memory(needed_bytes: int, limit_bytes: int | None = None, what: str = "this run") -> None:
    """Refuse up front, with the numbers, when `needed_bytes` exceeds the limit (default: available memory)."""
    limit = available_memory_bytes() if limit_bytes is None else limit_bytes
    if limit is not None and needed_bytes > limit:
        raise InputImageError(
            f"{what} needs about {needed_bytes / 1024 ** 3:.1f} GB of memory but only {limit / 1024 ** 3:.1f} GB "
            "is available; crop or downsample the fixed image, free memory, or pass a larger --max-memory")


# ---- output folders -----------------------------------------------------------------------------------

def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, known: set | None = None) -> Path:
    """Make sure `out_dir` can take a run's outputs, before any work: not a file, not under a file,
    writable, and empty unless `overwrite` (then only the `known` outputs of an earlier run are replaced).

    Raises JointRegSegError naming the problem; creates nothing."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise JointRegSegError(f"--out {out_dir} is a file, not a folder; choose a folder")
    ancestor = out_dir if out_dir.exists() else out_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise JointRegSegError(f"--out {out_dir} cannot be created: {ancestor} is a file, not a folder")
    probe_dir = out_dir.parent if out_dir.parent.exists() else ancestor
    try:
        probe = tempfile.mkdtemp(prefix=".jointregseg-write-test-", dir=probe_dir)
        os.rmdir(probe)
        if out_dir.exists() and not os.access(out_dir, os.W_OK | os.X_OK):
            raise PermissionError(f"{out_dir} is read-only")
    except OSError as err:
        raise JointRegSegError(f"--out {out_dir} is not writable ({err.strerror or err}); "
                               "choose a folder you can write to") from None
    if out_dir.is_dir():
        present = sorted(p.name for p in out_dir.iterdir())
        if present and not overwrite:
            shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
            raise JointRegSegError(f"--out {out_dir} is not empty ({len(present)} entries: {shown}); pass "
                                   "--overwrite to replace an earlier run's outputs, or choose an empty folder")
    return out_dir


@contextlib.contextmanager
def staged_output_dir(out_dir: str | os.PathLike, replace: set | list | tuple | None = None):
    """Yield a staging folder; on success move every file into `out_dir`, on failure delete it all.

    Each file lands with os.replace, so no reader ever sees a half-written output. `replace`: names of
    an earlier run's outputs to remove from `out_dir` when this run did not write them again (so old and
    new outputs never mix). SIGINT/SIGTERM are held back while files move and the staging folder goes,
    then delivered.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        with _signals_held():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    with _signals_held():
        try:
            out_dir.mkdir(exist_ok=True)
            fresh = {item.name for item in staging.iterdir()}
            for name in sorted(set(replace or ()) - fresh):
                stale = out_dir / name
                if stale.is_file() or stale.is_symlink():
                    stale.unlink()
            for item in sorted(staging.iterdir()):
                os.replace(item, out_dir / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM that arrive inside the block are recorded and delivered after it, each one. Python
    runs its signal handlers in the main thread whichever thread the kernel picked, so masking the signals
    in the main thread (pthread_sigmask) would not stop a handler from raising between two moves; swapping
    the handlers does. Only the main thread can swap them; elsewhere the block runs as it is."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught, previous = [], {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler is None:          # installed outside Python: cannot be put back, so left alone
                continue
            previous[sig] = handler
            signal.signal(sig, lambda number, _frame: caught.append(number))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _deliver(list(dict.fromkeys(caught)))


def _deliver(signals: list) -> None:
    """Raise each signal in turn; a handler that raises does not keep the next one from being delivered."""
    import signal
    if signals:
        try:
            signal.raise_signal(signals[0])
        finally:
            _deliver(signals[1:])
