//! The disk tier's file format.
//!
//! A spill file is a standard safetensors file whose `__metadata__` also holds
//! `"sire.format": "1"` and one xxh3-64 checksum per tensor, under the key
//! `sire.xxh3.<tensor name>` as 16 lowercase hex digits.
//!
//! [`write`] streams each tensor's bytes straight from its memory to a
//! temporary file and renames it into place, so that a reader sees either the
//! old file or the whole new one. [`read`] copies each tensor's bytes from an
//! mmap of the file straight into a freshly allocated tensor, verifying the
//! checksum as it goes and handing the file's pages back as soon as they are
//! copied, so that the process never holds a model twice.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};
use safetensors::tensor::{Metadata, SafeTensors, TensorInfo};
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};

/// Metadata key of the format version, and its value.
const FORMAT_KEY: &str = "sire.format";
const FORMAT_VERSION: &str = "1";
/// Prefix of the metadata keys holding the checksums.
const CHECKSUM_PREFIX: &str = "sire.xxh3.";
/// Length of the little-endian header-length prefix.
const PREFIX_LEN: usize = 8;
/// Bytes copied at a time; each chunk is hashed right after, while in cache.
const CHUNK: usize = 512 << 10;
/// Size of a transparent huge page (x86-64, aarch64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;
/// Bytes of the mapped file populated, then released, at a time.
const WINDOW: usize = 8 << 20;
/// Capacity of the write buffer (larger writes bypass it).
const WRITE_BUFFER: usize = 1 << 20;

/// The safetensors dtype that stores `kind`.
///
/// Only kinds with a plain safetensors equivalent are supported: Float,
/// Double, Half, BFloat16, Int8, Uint8, Int16, Int, Int64 and Bool.
pub(crate) fn kind_to_dtype(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(invalid_input(format!(
                "tensors of kind {other:?} cannot be spilled (supported: Float, Double, Half, \
                 BFloat16, Int8, Uint8, Int16, Int, Int64, Bool)"
            )))
        }
    })
}

/// The tensor kind for a safetensors dtype, if `sire` supports it.
fn dtype_to_kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Writes `tensors` to `path` as a spill file and returns its size in bytes.
///
/// All tensors must be dense CPU tensors of a kind [`kind_to_dtype`] accepts,
/// with distinct names; this is checked before anything is written. A
/// non-contiguous tensor is made contiguous (one tensor at a time); the others
/// are written straight from their memory, which must not be modified while
/// this runs. In the file the tensors are ordered by decreasing element size,
/// so that each one's data is aligned to its element size.
///
/// The file is written to `<path>.tmp`, synced, renamed over `path`, and the
/// directory is synced. On an error before the rename the temporary file is
/// removed and `path` is untouched; an error syncing the directory after the
/// rename leaves the new file in place.
pub(crate) fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<u64> {
    let (slots, data_len) = layout(tensors)?;
    // Checksums have a fixed width, so the header's length is known up front;
    // the real checksums are written over the placeholders at the end.
    let placeholder = header(&slots, &vec![0; slots.len()])?;
    let total = (PREFIX_LEN + placeholder.len() + data_len) as u64;

    let tmp = TempFile::create(path)?;
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, &tmp.file);
    out.write_all(&(placeholder.len() as u64).to_le_bytes())?;
    out.write_all(&placeholder)?;
    let checksums = slots.iter().map(|slot| write_data(&mut out, slot.tensor)).collect::<Result<Vec<_>>>()?;
    out.flush()?;
    drop(out);

    let header = header(&slots, &checksums)?;
    assert_eq!(header.len(), placeholder.len(), "checksums have a fixed width");
    tmp.file.write_all_at(&header, PREFIX_LEN as u64)?;
    tmp.file.sync_all()?;
    tmp.commit(path)?;
    Ok(total)
}

/// Reads the tensors named `names`, in that order, from a spill file or any
/// safetensors file.
///
/// Each tensor is a freshly allocated, contiguous CPU tensor. Its checksum, if
/// the file has one, is verified; `require_checksum` makes a missing checksum
/// an error too. A missing name, a bad header, a truncated file, an
/// unsupported dtype or a checksum mismatch is [`Error::Corrupt`].
///
/// The file is mapped, not read: each window of it is populated, copied into
/// the tensor and released again, so the process holds the tensors plus one
/// window, never the file's pages and the tensors both. Tensors of 2 MiB or
/// more are asked for transparent huge pages, which makes faulting in their
/// fresh memory, the main cost of the copy, several times cheaper.
pub(crate) fn read(path: &Path, names: &[String], require_checksum: bool) -> Result<Vec<Tensor>> {
    read_into(path, names, require_checksum, None)
}

/// The names of the tensors of a safetensors file (a spill file or any
/// other), in the order of their data in the file. A malformed file is
/// [`Error::Corrupt`] with the reason; a file that cannot be opened is an I/O
/// error naming it.
pub(crate) fn names(path: &Path) -> Result<Vec<String>> {
    let corrupt = |detail: String| Error::Corrupt { path: path.to_owned(), detail };
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = File::open(path).map_err(named)?;
    let len = file.metadata().map_err(named)?.len();
    if len < PREFIX_LEN as u64 {
        return Err(corrupt(format!("the file is {len} bytes long, too short for a safetensors header")));
    }
    // SAFETY: as in `read_into`: a read-only mapping, only read here.
    let map = unsafe { Mmap::map(&file) }.map_err(named)?;
    let (_, metadata) = SafeTensors::read_metadata(&map).map_err(|e| corrupt(format!("bad header: {e}")))?;
    let mut names: Vec<(usize, String)> =
        metadata.tensors().into_iter().map(|(name, info)| (info.data_offsets.0, name)).collect();
    names.sort();
    Ok(names.into_iter().map(|(_, n)| n).collect())
}

/// Where [`read_into`] puts tensor `slot`: a contiguous CPU tensor that the
/// caller allocated (a view into a packed, possibly pinned, home copy).
pub(crate) type Dest<'a> = &'a mut dyn FnMut(usize) -> Result<Tensor>;

/// [`read`], copying each tensor straight from the mapping into `dest(slot)`
/// when given (no intermediate buffer). A destination whose size, dtype or
/// layout does not match the file is a [`Error::Corrupt`] before any copy.
pub(crate) fn read_into(
    path: &Path,
    names: &[String],
    require_checksum: bool,
    mut dest: Option<Dest<'_>>,
) -> Result<Vec<Tensor>> {
    let corrupt = |detail: String| Error::Corrupt { path: path.to_owned(), detail };
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < PREFIX_LEN as u64 {
        return Err(corrupt(format!("the file is {len} bytes long, too short for a safetensors header")));
    }
    // SAFETY: the mapping is read-only and only read through slices that do
    // not outlive it. `write` replaces a spill file by renaming a new file
    // over it, which leaves the inode mapped here intact. Another process
    // truncating the file meanwhile is outside this module's contract: it is
    // caught when a window is populated, but racing the copy of a window it
    // would raise SIGBUS.
    let map = unsafe { Mmap::map(&file) }?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| corrupt(format!("bad header: {e}")))?;
    let data_start = PREFIX_LEN + header_len;
    let extra = metadata.metadata().as_ref();
    if let Some(version) = extra.and_then(|m| m.get(FORMAT_KEY)) {
        if version != FORMAT_VERSION {
            return Err(corrupt(format!("unknown spill format version {version:?}")));
        }
    }

    // Check every request before allocating anything.
    let mut jobs = names
        .iter()
        .enumerate()
        .map(|(slot, name)| {
            let info =
                metadata.info(name).ok_or_else(|| corrupt(format!("no tensor `{name}` in the file")))?;
            let kind = dtype_to_kind(info.dtype)
                .ok_or_else(|| corrupt(format!("tensor `{name}` has unsupported dtype {}", info.dtype)))?;
            let shape = info
                .shape
                .iter()
                .map(|&d| i64::try_from(d))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| corrupt(format!("tensor `{name}` has an impossible shape")))?;
            let key = format!("{CHECKSUM_PREFIX}{name}");
            let checksum = match extra.and_then(|m| m.get(&key)) {
                Some(hex) => Some(
                    parse_checksum(hex)
                        .ok_or_else(|| corrupt(format!("malformed checksum {hex:?} for tensor `{name}`")))?,
                ),
                None if require_checksum => return Err(corrupt(format!("no checksum for tensor `{name}`"))),
                None => None,
            };
            let (start, end) = info.data_offsets;
            Ok(Job { slot, name, kind, shape, range: data_start + start..data_start + end, checksum })
        })
        .collect::<Result<Vec<_>>>()?;
    // Copy in file order, so that the file is read front to back.
    jobs.sort_by_key(|job| job.range.start);

    // A hint only: it makes a cold file's read-ahead aggressive.
    let _ = map.advise(Advice::Sequential);
    let mut copier = Copier { map: &map, path, page: page_size(), populate: true };
    let mut out: Vec<Option<Tensor>> = names.iter().map(|_| None).collect();
    for job in &jobs {
        let given = match dest.as_mut() {
            Some(f) => {
                let t = f(job.slot)?;
                if t.device() != Device::Cpu
                    || t.kind() != job.kind
                    || t.size() != job.shape
                    || !t.is_contiguous()
                    || byte_len(&t) != job.range.len()
                {
                    return Err(corrupt(format!(
                        "tensor `{}` is {:?} {:?} in the file but the destination is {:?} {:?}",
                        job.name,
                        job.kind,
                        job.shape,
                        t.kind(),
                        t.size()
                    )));
                }
                Some(t)
            }
            None => None,
        };
        out[job.slot] = Some(copier.tensor(job, given)?);
    }
    Ok(out.into_iter().map(|t| t.expect("every requested tensor was read")).collect())
}

/// A tensor to be written: where it goes in the file, and its data.
struct Slot<'a> {
    name: &'a str,
    tensor: &'a Tensor,
    info: TensorInfo,
}

/// Checks `tensors` and lays them out in the file's data section, returning
/// the slots in file order and the data section's length.
fn layout(tensors: &[(String, Tensor)]) -> Result<(Vec<Slot<'_>>, usize)> {
    let mut seen = HashSet::new();
    let mut slots = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let bad = |why: String| invalid_input(format!("cannot spill tensor `{name}`: {why}"));
        if name == "__metadata__" || !seen.insert(name.as_str()) {
            return Err(bad("its name is reserved or used twice".into()));
        }
        if tensor.device() != Device::Cpu {
            return Err(bad(format!("it is on {:?}, not the CPU", tensor.device())));
        }
        if tensor.is_sparse() || tensor.is_mkldnn() {
            return Err(bad("it is not a dense tensor".into()));
        }
        let kind = tensor.kind();
        let Ok(dtype) = kind_to_dtype(kind) else {
            return Err(bad(format!("its kind {kind:?} has no safetensors dtype")));
        };
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        slots.push(Slot {
            name,
            tensor,
            info: TensorInfo { dtype, shape, data_offsets: (0, byte_len(tensor)) },
        });
    }
    // Largest elements first (stable, so ties keep the caller's order): every
    // offset is then a multiple of the element size that follows it.
    slots.sort_by_key(|slot| std::cmp::Reverse(slot.info.dtype.bitsize()));
    let mut offset = 0;
    for slot in &mut slots {
        let len = slot.info.data_offsets.1;
        slot.info.data_offsets = (offset, offset + len);
        offset += len;
    }
    Ok((slots, offset))
}

/// The JSON header for `slots` with `checksums`, padded with spaces to a
/// multiple of 8 bytes so that the data starts aligned.
fn header(slots: &[Slot<'_>], checksums: &[u64]) -> Result<Vec<u8>> {
    let mut extra: HashMap<String, String> = slots
        .iter()
        .zip(checksums)
        .map(|(slot, sum)| (format!("{CHECKSUM_PREFIX}{}", slot.name), format!("{sum:016x}")))
        .collect();
    extra.insert(FORMAT_KEY.into(), FORMAT_VERSION.into());
    let infos = slots.iter().map(|slot| (slot.name.to_owned(), slot.info.clone())).collect();
    let metadata = Metadata::new(Some(extra), infos).map_err(io::Error::other)?;
    let mut bytes = serde_json::to_vec(&metadata).map_err(io::Error::other)?;
    bytes.resize(bytes.len().next_multiple_of(PREFIX_LEN), b' ');
    Ok(bytes)
}

/// Writes `tensor`'s bytes to `out` and returns their xxh3-64 checksum.
fn write_data(out: &mut impl Write, tensor: &Tensor) -> Result<u64> {
    let contiguous;
    let tensor = if tensor.is_contiguous() {
        tensor
    } else {
        contiguous = tensor.f_contiguous()?;
        &contiguous
    };
    let len = byte_len(tensor);
    let mut hasher = Xxh3::new();
    if len > 0 {
        // SAFETY: `tensor` is a contiguous, dense CPU tensor (checked by
        // `layout`), so its `len` bytes start at `data_ptr` and stay allocated
        // while it is borrowed; `write` requires that nothing modifies them
        // meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(tensor.data_ptr().cast::<u8>(), len) };
        for chunk in bytes.chunks(CHUNK) {
            hasher.update(chunk);
            out.write_all(chunk)?;
        }
    }
    Ok(hasher.digest())
}

/// Size in bytes of a tensor's elements.
fn byte_len(tensor: &Tensor) -> usize {
    tensor.numel() * tensor.kind().elt_size_in_bytes()
}

/// One tensor to be read: where its bytes are in the file and what to make.
struct Job<'a> {
    slot: usize,
    name: &'a str,
    kind: Kind,
    shape: Vec<i64>,
    range: Range<usize>,
    checksum: Option<u64>,
}

/// Copies ranges of a mapped file into new tensors, window by window.
struct Copier<'a> {
    map: &'a Mmap,
    path: &'a Path,
    page: usize,
    /// Whether `MADV_POPULATE_READ` is worth trying (the kernel has it).
    populate: bool,
}

impl Copier<'_> {
    /// Makes the tensor `job` describes from its bytes in the file, verifying
    /// its checksum if it has one, and releases the file's pages behind it.
    fn tensor(&mut self, job: &Job<'_>, given: Option<Tensor>) -> Result<Tensor> {
        let corrupt = |detail: String| Error::Corrupt { path: self.path.to_owned(), detail };
        let fresh = given.is_none();
        let tensor = match given {
            Some(t) => t,
            None => Tensor::f_empty(job.shape.as_slice(), (job.kind, Device::Cpu))?,
        };
        assert_eq!(byte_len(&tensor), job.range.len(), "destination size checked by the caller");
        let mut hasher = job.checksum.map(|_| Xxh3::new());
        let dst = tensor.data_ptr().cast::<u8>();
        if fresh {
            self.prefer_huge_pages(dst, job.range.len());
        }
        let mut pos = job.range.start;
        while pos < job.range.end {
            // Windows end on multiples of WINDOW in the file, so only the last
            // page of a tensor may be released while still partly needed.
            let end = (pos / WINDOW + 1).saturating_mul(WINDOW).min(job.range.end);
            self.populate(pos..end)
                .map_err(|e| corrupt(format!("cannot read tensor `{}`: {e}", job.name)))?;
            for start in (pos..end).step_by(CHUNK) {
                let src = &self.map[start..(start + CHUNK).min(end)];
                // SAFETY: `dst` points at the `job.range.len()` bytes of a
                // contiguous CPU tensor (allocated above, or a destination the
                // caller handed over for this read and checked for size and
                // contiguity), which nothing else touches during the read;
                // `start - job.range.start + src.len()` is at most that length,
                // and a file mapping cannot overlap the allocation.
                let copied = unsafe {
                    let at = dst.add(start - job.range.start);
                    std::ptr::copy_nonoverlapping(src.as_ptr(), at, src.len());
                    std::slice::from_raw_parts(at, src.len())
                };
                if let Some(hasher) = hasher.as_mut() {
                    hasher.update(copied);
                }
            }
            self.release(pos..end);
            pos = end;
        }
        if let (Some(want), Some(hasher)) = (job.checksum, hasher) {
            let got = hasher.digest();
            if got != want {
                return Err(corrupt(format!(
                    "checksum mismatch for tensor `{}`: stored {want:016x}, computed {got:016x}",
                    job.name
                )));
            }
        }
        Ok(tensor)
    }

    /// Faults in the pages of `range` in one go, where the kernel can.
    fn populate(&mut self, range: Range<usize>) -> io::Result<()> {
        if !self.populate {
            return Ok(());
        }
        match self.map.advise_range(Advice::PopulateRead, range.start, range.len()) {
            Ok(()) => Ok(()),
            // Before Linux 5.14: fall back to faulting pages in one by one.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.populate = false;
                Ok(())
            }
            // The pages cannot be read (the file shrank, or an I/O error):
            // copying them would raise SIGBUS.
            Err(e) => Err(e),
        }
    }

    /// Asks for transparent huge pages for the `len` fresh bytes at `dst`.
    ///
    /// Faulting the destination in 2 MiB at a time rather than 4 KiB is what
    /// makes the copy keep up with `read(2)` into a fresh buffer. A hint only:
    /// where huge pages are off or unavailable nothing changes.
    fn prefer_huge_pages(&self, dst: *mut u8, len: usize) {
        if len < HUGE_PAGE {
            return;
        }
        let start = (dst as usize).next_multiple_of(self.page);
        let end = (dst as usize + len) / self.page * self.page;
        // SAFETY: `start..end` is the whole pages inside the tensor's fresh
        // allocation, which no one else uses; MADV_HUGEPAGE changes only how
        // those pages are backed, never what they hold.
        let _ = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }

    /// Drops the pages covering `range` from the process's resident set
    /// (they stay in the page cache).
    fn release(&self, range: Range<usize>) {
        let start = range.start / self.page * self.page;
        let end = range.end.next_multiple_of(self.page).min(self.map.len());
        // SAFETY: `map` is a shared, read-only mapping of a file: dropping its
        // pages only makes a later access fault them back in with the same
        // contents, so no reference into the mapping sees a change.
        let _ = unsafe { self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
    }
}

/// Parses a checksum written by [`write`]: exactly 16 lowercase hex digits.
fn parse_checksum(hex: &str) -> Option<u64> {
    let valid = hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    valid.then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

/// The system's page size.
fn page_size() -> usize {
    // SAFETY: `sysconf` has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// An invalid-argument error.
fn invalid_input(message: String) -> Error {
    io::Error::new(io::ErrorKind::InvalidInput, message).into()
}

/// The `<path>.tmp` file a spill file is written to, removed on drop unless
/// it was renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl TempFile {
    /// Creates (or truncates) the temporary file for `target`.
    fn create(target: &Path) -> io::Result<Self> {
        let mut path = target.as_os_str().to_owned();
        path.push(".tmp");
        let path = PathBuf::from(path);
        let file = File::create(&path)?;
        Ok(Self { path, file, committed: false })
    }

    /// Renames the file over `target` and syncs the directory.
    fn commit(mut self, target: &Path) -> io::Result<()> {
        fs::rename(&self.path, target)?;
        self.committed = true;
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Serializes the tests that measure memory or time.
    static HEAVY: Mutex<()> = Mutex::new(());
    const MIB: u64 = 1 << 20;

    fn cpu(kind: Kind) -> (Kind, Device) {
        (kind, Device::Cpu)
    }

    fn named(tensors: Vec<(&str, Tensor)>) -> Vec<(String, Tensor)> {
        tensors.into_iter().map(|(n, t)| (n.to_owned(), t)).collect()
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|&n| n.to_owned()).collect()
    }

    /// A tensor's elements as raw bytes, in row-major order.
    fn raw(tensor: &Tensor) -> Vec<u8> {
        let mut bytes = vec![0; byte_len(tensor)];
        tensor.contiguous().copy_data_u8(&mut bytes, tensor.numel());
        bytes
    }

    /// The detail of a `Corrupt` error, failing the test on anything else.
    fn corrupt_detail<T: std::fmt::Debug>(result: Result<T>) -> String {
        match result {
            Err(Error::Corrupt { detail, .. }) => detail,
            other => panic!("expected Error::Corrupt, got {other:?}"),
        }
    }

    /// Where the data of tensor `name` starts in the file at `path`.
    fn data_offset(path: &Path, name: &str) -> usize {
        let bytes = fs::read(path).unwrap();
        let (header_len, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        PREFIX_LEN + header_len + metadata.info(name).unwrap().data_offsets.0
    }

    fn sample() -> Vec<(String, Tensor)> {
        named(vec![
            ("u8", Tensor::from_slice(&[0u8, 1, 127, 128, 255])),
            ("f32", Tensor::randn([3, 4], cpu(Kind::Float))),
            ("f64", Tensor::randn([5], cpu(Kind::Double))),
            ("f16", Tensor::randn([2, 3], cpu(Kind::Half))),
            ("bf16", Tensor::randn([7], cpu(Kind::BFloat16))),
            ("i8", Tensor::from_slice(&[-128i8, -1, 0, 1, 127])),
            ("i16", Tensor::from_slice(&[i16::MIN, -1, 0, i16::MAX])),
            ("i32", Tensor::from_slice(&[i32::MIN, 0, i32::MAX])),
            ("i64", Tensor::from_slice(&[i64::MIN, 0, i64::MAX]).view([3, 1])),
            ("bool", Tensor::from_slice(&[true, false, true])),
            ("transposed", Tensor::randn([4, 6], cpu(Kind::Float)).tr()),
            ("empty", Tensor::zeros([0, 5], cpu(Kind::Float))),
            ("scalar", Tensor::from(2.5f64)),
        ])
    }

    #[test]
    fn round_trip_preserves_kinds_shapes_and_bits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.spill");
        let tensors = sample();
        assert!(!tensors[10].1.is_contiguous());

        let size = write(&path, &tensors).unwrap();
        assert_eq!(size, fs::metadata(&path).unwrap().len());
        assert!(!dir.path().join("m.spill.tmp").exists());

        // Ask in a different order than written, and twice for one name.
        let mut names: Vec<String> = tensors.iter().rev().map(|(n, _)| n.clone()).collect();
        names.push("f32".into());
        let read = read(&path, &names, true).unwrap();
        assert_eq!(read.len(), names.len());
        for (name, got) in names.iter().zip(&read) {
            let want = &tensors.iter().find(|(n, _)| n == name).unwrap().1;
            assert_eq!(got.kind(), want.kind(), "{name}");
            assert_eq!(got.size(), want.size(), "{name}");
            assert_eq!(got.device(), Device::Cpu, "{name}");
            assert!(got.is_contiguous(), "{name}");
            assert!(got.equal(want), "{name}");
            assert_eq!(raw(got), raw(want), "{name}");
        }
    }

    #[test]
    fn file_is_standard_safetensors_with_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.spill");
        let tensors = sample();
        write(&path, &tensors).unwrap();

        let bytes = fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        let extra = metadata.metadata().as_ref().unwrap();
        assert_eq!(extra[FORMAT_KEY], "1");
        assert_eq!(extra.len(), tensors.len() + 1);
        for (name, tensor) in &tensors {
            let view = file.tensor(name).unwrap();
            assert_eq!(view.data(), raw(tensor).as_slice(), "{name}");
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(start % tensor.kind().elt_size_in_bytes(), 0, "{name} misaligned");
            let sum = &extra[&format!("sire.xxh3.{name}")];
            assert_eq!(sum, &format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&raw(tensor))));
        }
        // libtorch's own reader accepts it too.
        let by_tch = Tensor::read_safetensors(&path).unwrap();
        assert_eq!(by_tch.len(), tensors.len());
    }

    #[test]
    fn corrupted_byte_is_reported_with_the_tensor_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.spill");
        let tensors = named(vec![
            ("a", Tensor::randn([64], cpu(Kind::Float))),
            ("b", Tensor::randn([64], cpu(Kind::Float))),
        ]);
        write(&path, &tensors).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[data_offset(&path, "b") + 17] ^= 0x40;
        fs::write(&path, &bytes).unwrap();

        let detail = corrupt_detail(read(&path, &strings(&["a", "b"]), false));
        assert!(detail.contains("checksum mismatch for tensor `b`"), "{detail}");
        // Each tensor has its own checksum: `a` is still readable.
        let a = read(&path, &strings(&["a"]), true).unwrap();
        assert!(a[0].equal(&tensors[0].1));
    }

    #[test]
    fn truncated_garbled_or_incomplete_files_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.spill");
        let names = strings(&["x"]);
        write(&path, &named(vec![("x", Tensor::randn([256], cpu(Kind::Float)))])).unwrap();
        let good = fs::read(&path).unwrap();

        let detail = corrupt_detail(read(&path, &strings(&["x", "nope"]), false));
        assert!(detail.contains("no tensor `nope`"), "{detail}");

        fs::write(&path, &good[..good.len() - 1]).unwrap();
        corrupt_detail(read(&path, &names, false));
        fs::write(&path, &good[..good.len() / 2]).unwrap();
        corrupt_detail(read(&path, &names, false));
        fs::write(&path, &good[..5]).unwrap();
        corrupt_detail(read(&path, &names, false));
        fs::write(&path, b"").unwrap();
        corrupt_detail(read(&path, &names, false));

        let mut garbage = 16u64.to_le_bytes().to_vec();
        garbage.extend_from_slice(b"this is not json");
        fs::write(&path, &garbage).unwrap();
        let detail = corrupt_detail(read(&path, &names, false));
        assert!(detail.contains("bad header"), "{detail}");

        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&good[8..]);
        fs::write(&path, &huge).unwrap();
        corrupt_detail(read(&path, &names, false));

        // A checksum that is not 16 lowercase hex digits (same length, so the
        // header stays well-formed).
        let sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&good[good.len() - 1024..]));
        let at = good.windows(16).position(|w| w == sum.as_bytes()).unwrap();
        let mut bad = good.clone();
        bad[at] = b'g';
        fs::write(&path, &bad).unwrap();
        let detail = corrupt_detail(read(&path, &names, false));
        assert!(detail.contains("malformed checksum"), "{detail}");
    }

    #[test]
    fn missing_file_is_io() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(&dir.path().join("absent"), &strings(&["x"]), false).unwrap_err();
        assert!(matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::NotFound), "{err:?}");
    }

    #[test]
    fn plain_safetensors_files_are_read_without_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.safetensors");
        let x = Tensor::randn([3, 5], cpu(Kind::Float));
        let y = Tensor::from_slice(&[1i64, 2, 3]);
        Tensor::write_safetensors(&[("x", &x), ("y", &y)], &path).unwrap();

        let got = read(&path, &strings(&["y", "x"]), false).unwrap();
        assert!(got[0].equal(&y) && got[1].equal(&x));
        let detail = corrupt_detail(read(&path, &strings(&["x"]), true));
        assert!(detail.contains("no checksum for tensor `x`"), "{detail}");
    }

    #[test]
    fn failed_rename_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // `path` is a non-empty directory: everything succeeds but the rename.
        let path = dir.path().join("m.spill");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"x").unwrap();
        let err = write(&path, &sample()).unwrap_err();
        assert!(matches!(err, Error::Io(_)), "{err:?}");
        assert!(!dir.path().join("m.spill.tmp").exists());
        assert!(path.join("keep").exists());
    }

    #[test]
    fn unusable_directory_is_io_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("m.spill");
        let err = write(&path, &sample()).unwrap_err();
        assert!(matches!(err, Error::Io(_)), "{err:?}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn failed_write_keeps_the_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.spill");
        write(&path, &sample()).unwrap();
        let before = fs::read(&path).unwrap();

        let mut bad = sample();
        bad.push(("c".into(), Tensor::randn([4], cpu(Kind::ComplexFloat))));
        let err = write(&path, &bad).unwrap_err();
        assert!(matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::InvalidInput), "{err:?}");
        assert!(err.to_string().contains("`c`"), "{err}");

        let mut twice = sample();
        twice.push(("f32".into(), Tensor::zeros([1], cpu(Kind::Float))));
        assert!(write(&path, &twice).is_err());

        assert_eq!(fs::read(&path).unwrap(), before);
        assert!(!dir.path().join("m.spill.tmp").exists());
        assert!(read(&path, &strings(&["f32"]), true).is_ok());
    }

    /// The process's resident set, in bytes.
    fn resident() -> u64 {
        let statm = fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * page_size() as u64
    }

    /// Resets the process's peak resident set to the current one; false where
    /// the kernel does not allow it.
    fn reset_peak_resident() -> bool {
        fs::write("/proc/self/clear_refs", "5").is_ok()
    }

    /// The process's peak resident set (`VmHWM`), in bytes.
    fn peak_resident() -> u64 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    #[test]
    fn read_holds_one_copy_of_the_data() {
        let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
        const SIZE: u64 = 64 * MIB;
        let big = || Tensor::arange((SIZE / 4) as i64, cpu(Kind::Int));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.spill");
        let tensors = named(vec![("big", big()), ("small", Tensor::ones([3], cpu(Kind::Float)))]);
        write(&path, &tensors).unwrap();
        drop(tensors);
        let names = strings(&["small", "big"]);
        // Warm up the page cache, the allocator and libtorch.
        drop(read(&path, &names, true).unwrap());

        let before = resident();
        let peak_known = reset_peak_resident();
        let tensors = read(&path, &names, true).unwrap();
        let after = resident();
        // The peak catches file pages held during the read; after it they
        // are unmapped anyway.
        let peak = if peak_known { peak_resident() } else { after };
        let (held, grew) = (after.saturating_sub(before), peak.saturating_sub(before));
        eprintln!("resident: +{} MiB held, +{} MiB at peak", held / MIB, grew / MIB);
        assert!(held > SIZE / 2, "the result is not resident (+{held} bytes): bad measurement");
        assert!(held < SIZE * 5 / 4, "holding the result grew the resident set by {held} bytes");
        assert!(grew < SIZE * 5 / 4, "reading grew the resident set by up to {grew} bytes");
        assert!(tensors[1].equal(&big()));
    }

    /// Prints how fast `read` is next to `std::fs::read` of the same cached
    /// file: `cargo test --release --lib spill -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, informational"]
    fn read_throughput_vs_fs_read() {
        let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
        const SIZE: u64 = 256 * MIB;
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("big.spill");
        let plain = dir.path().join("big.safetensors");
        let tensors = named(vec![
            ("a", Tensor::randn([(SIZE / 8) as i64], cpu(Kind::Float))),
            ("b", Tensor::randn([(SIZE / 16) as i64], cpu(Kind::Half))),
            ("c", Tensor::randn([(SIZE / 32) as i64, 4], cpu(Kind::BFloat16))),
        ]);
        write(&spill, &tensors).unwrap();
        Tensor::write_safetensors(&tensors, &plain).unwrap();
        drop(tensors);
        let names = strings(&["a", "b", "c"]);
        let best = |f: &dyn Fn()| {
            f();
            (0..7)
                .map(|_| {
                    let start = std::time::Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        for (label, path, checked) in [("spill", &spill, true), ("plain", &plain, false)] {
            let base = best(&|| drop(fs::read(path).unwrap()));
            let ours = best(&|| drop(read(path, &names, checked).unwrap()));
            let gbps = |s: f64| SIZE as f64 / s / 1e9;
            eprintln!(
                "{label}: fs::read {:.2} GB/s, spill::read {:.2} GB/s, ratio {:.2}",
                gbps(base),
                gbps(ours),
                base / ours
            );
        }
    }

    #[test]
    fn kind_conversions_round_trip() {
        for kind in [
            Kind::Float,
            Kind::Double,
            Kind::Half,
            Kind::BFloat16,
            Kind::Int8,
            Kind::Uint8,
            Kind::Int16,
            Kind::Int,
            Kind::Int64,
            Kind::Bool,
        ] {
            let dtype = kind_to_dtype(kind).unwrap();
            assert_eq!(dtype_to_kind(dtype), Some(kind));
            assert_eq!(dtype.bitsize(), 8 * kind.elt_size_in_bytes());
        }
        for kind in [Kind::ComplexFloat, Kind::QInt8, Kind::Float8e5m2] {
            assert!(kind_to_dtype(kind).is_err());
        }
        assert_eq!(dtype_to_kind(Dtype::U32), None);
        assert_eq!(parse_checksum("00000000000000ff"), Some(255));
        assert_eq!(parse_checksum("00000000000000FF"), None);
        assert_eq!(parse_checksum("+0000000000000ff"), None);
        assert_eq!(parse_checksum("ff"), None);
    }
}
