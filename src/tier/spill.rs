//! The disk tier's file format.
//!
//! A spill file is a standard safetensors file whose `__metadata__` also holds
//! `"sire.format": "1"` and one xxh3-64 checksum per tensor, under the key
//! `sire.xxh3.<tensor name>` as 16 lowercase hex digits.
//!
//! A spill file is bound to its model: its `__metadata__` also holds the
//! instance id (the random name of the instance's private folder), the model's
//! id and a random nonce drawn for each write (`sire.instance`, `sire.model`,
//! `sire.nonce`). [`SpillFile`] remembers the nonce of its last write and
//! refuses, as [`Error::Corrupt`], any file that does not carry exactly that
//! identity: another model's file copied over it, a file forged with
//! recomputed checksums, another process's file.
//!
//! Writing streams each tensor's bytes straight from its memory to a
//! temporary file (created `O_EXCL | O_NOFOLLOW`, mode 0600) and renames it
//! into place, so that a reader sees either the old file or the whole new one.
//! Reading opens the file `O_NOFOLLOW | O_NONBLOCK` (a symlink or a FIFO is
//! refused, never followed or waited on), requires a regular file, and copies
//! each tensor's bytes from an mmap of the file straight into a freshly
//! allocated tensor, verifying the checksum as it goes and handing the file's
//! pages back as soon as they are copied, so that the process never holds a
//! model twice.
//!
//! A model's source file (a safetensors file it was loaded from) is a
//! [`Source`]: its size, modification time and the xxh3 of every tensor read
//! the first time are checked on every reload, and a file that changed is
//! [`Error::Corrupt`].
//!
//! [`PrivateDir`] is an instance's folder under the spill root: created 0700
//! with a random name, locked (`flock` on the folder) for the instance's life, so that the
//! next set-up under the same root can tell the folders of dead instances and
//! [`reclaim`](dir::reclaim) them.
//!
//! Here: the format, reading (copied or mapped) and [`Source`]; in
//! `spill/`: writing (`write.rs`), mapped reads (`map.rs`), the private
//! folder (`dir.rs`).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};
use safetensors::tensor::{Metadata, SafeTensors, TensorInfo};
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};
use crate::faults::{self, Point};
use crate::tier::ffi;
use dir::check_private_dir;
#[cfg(test)]
use dir::reclaim;
pub(crate) use dir::PrivateDir;
use map::{map_tensors, Stamp};
#[cfg(test)]
use write::is_disk_full;
#[cfg(test)]
pub(crate) use write::write;
use write::{parent_dir, write_with};

/// Metadata key of the format version, and its value.
const FORMAT_KEY: &str = "sire.format";
const FORMAT_VERSION: &str = "1";
/// Prefix of the metadata keys holding the checksums.
const CHECKSUM_PREFIX: &str = "sire.xxh3.";
/// Metadata keys of a spill file's identity (see [`Identity`]).
const INSTANCE_KEY: &str = "sire.instance";
const MODEL_KEY: &str = "sire.model";
const NONCE_KEY: &str = "sire.nonce";
/// Flags of every open of a disk-tier file: a symlink is refused (`ELOOP`),
/// a FIFO or device does not block the open.
const OPEN_FLAGS: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
/// Length of the little-endian header-length prefix.
const PREFIX_LEN: usize = 8;
/// Bytes copied at a time; each chunk is hashed right after, while in cache.
const CHUNK: usize = 512 << 10;
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

/// The kind and shape of tensor `name` as a file's header declares them, or
/// why they cannot be read.
fn kind_and_shape(name: &str, info: &TensorInfo) -> std::result::Result<(Kind, Vec<i64>), String> {
    let kind = dtype_to_kind(info.dtype)
        .ok_or_else(|| format!("tensor `{name}` has unsupported dtype {}", info.dtype))?;
    let shape = info
        .shape
        .iter()
        .map(|&d| i64::try_from(d))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| format!("tensor `{name}` has an impossible shape"))?;
    Ok((kind, shape))
}

/// The tensor kind for a safetensors dtype, if `sire` supports it.
pub(crate) fn dtype_to_kind(dtype: Dtype) -> Option<Kind> {
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
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn read(path: &Path, names: &[String], require_checksum: bool) -> Result<Vec<Tensor>> {
    Ok(read_checked(path, names, Expect::Any { require_checksum }, How::Copy(None))?.tensors)
}

/// Maps the tensors named `names` from the safetensors file at `path`, as
/// [`read`] checks them (see [`How::Map`]); `None` where a tensor is not
/// aligned for its kind in the file.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn map(path: &Path, names: &[String], require_checksum: bool) -> Result<Option<Vec<Tensor>>> {
    let read = read_checked(path, names, Expect::Any { require_checksum }, How::Map { verified: None })?;
    Ok(read.mapped.then_some(read.tensors))
}

/// Reads the tensors named `names` from the file at `path` as the spill file
/// that model `model` of instance `instance` wrote with nonce `nonce` (see
/// [`SpillFile::read_into`]): for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn read_as_spill(
    path: &Path,
    names: &[String],
    instance: &str,
    model: u64,
    nonce: u128,
) -> Result<Vec<Tensor>> {
    let identity = Identity { instance: instance.into(), model, nonce };
    Ok(read_checked(path, names, Expect::Spill(&identity), How::Copy(None))?.tensors)
}

/// Writes `tensors` to `path` as the spill file of model `model` of instance
/// `instance`, with nonce `nonce` (see [`write`]): for the fuzz targets' seeds.
#[cfg(feature = "fuzzing")]
pub(crate) fn write_as_spill(
    path: &Path,
    tensors: &[(String, Tensor)],
    instance: &str,
    model: u64,
    nonce: u128,
) -> Result<u64> {
    write_with(path, tensors, Some(&Identity { instance: instance.into(), model, nonce }))
}

/// How [`read_checked`] makes the tensors.
enum How<'a> {
    /// Copies the bytes into fresh tensors, or into `dest(slot)` when given.
    Copy(Option<Dest<'a>>),
    /// Maps the file privately (copy-on-write) and points the tensors at the
    /// mapping, which lives as long as any of them: nothing is copied, a
    /// write to a tensor copies only the page it writes. Every tensor's bytes
    /// are verified first (checksums, recorded hashes), unless the file still
    /// has the stamp `verified` it had when they all were. A file whose
    /// tensors are not all aligned for their kinds is not mapped (the read
    /// tells, and makes no tensor).
    Map {
        /// The file's stamp when every tensor of it was last verified.
        verified: Option<Stamp>,
    },
}

/// Where [`read_checked`] puts tensor `slot`: a contiguous CPU tensor that the
/// caller allocated (a view into a packed, possibly pinned, home copy).
pub(crate) type Dest<'a> = &'a mut dyn FnMut(usize) -> Result<Tensor>;

/// What a read checks beyond the format.
#[derive(Clone, Copy)]
enum Expect<'a> {
    /// Any safetensors file: checksums are verified where present, and
    /// required if asked.
    #[cfg_attr(not(any(test, feature = "fuzzing")), allow(dead_code))]
    Any {
        /// Whether a tensor without a checksum is an error.
        require_checksum: bool,
    },
    /// A model's spill file: checksums required, and exactly this identity.
    Spill(&'a Identity),
    /// A model's source file: unchanged since it was first read.
    Source(&'a Source),
}

/// What [`read_checked`] read.
struct Read {
    /// The tensors, in the order asked for.
    tensors: Vec<Tensor>,
    /// The xxh3-64 of each tensor's bytes, where computed (always on the
    /// first read of a source file).
    sums: Vec<Option<u64>>,
    /// Whether the tensors point into a mapping of the file ([`How::Map`]).
    mapped: bool,
    /// The file's stamp, if this read verified every tensor in the file.
    verified: Option<Stamp>,
    /// The file's stamp when read.
    stamp: Stamp,
}

/// Opens `path` for reading, refusing (as [`Error::Corrupt`]) a symbolic
/// link, which is not followed, and anything but a regular file (a FIFO is
/// opened without blocking, then refused). With `ours` the file must also
/// belong to this process's user. A file that cannot be opened is
/// [`Error::Io`] with the OS error.
fn open_regular(path: &Path, ours: bool) -> Result<(File, fs::Metadata)> {
    let corrupt = |detail: String| Error::Corrupt { path: path.to_owned(), detail };
    let file = match OpenOptions::new().read(true).custom_flags(OPEN_FLAGS).open(path) {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(corrupt("it is a symbolic link, which sire does not follow".into()))
        }
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(corrupt(format!("it is not a regular file (mode {:o})", meta.mode())));
    }
    let me = ffi::euid();
    if ours && meta.uid() != me {
        return Err(corrupt(format!(
            "it belongs to uid {}, not to this process's user (uid {me})",
            meta.uid()
        )));
    }
    Ok((file, meta))
}

/// Reads the tensors named `names`, in that order, checking what `expect`
/// says, as `how` says: copying each tensor straight from the mapping into
/// `dest(slot)` when given (no intermediate buffer), or into a fresh tensor,
/// or mapping them. A destination whose size, dtype or layout does not match
/// the file is a [`Error::Corrupt`] before any copy.
fn read_checked(path: &Path, names: &[String], expect: Expect<'_>, how: How<'_>) -> Result<Read> {
    let corrupt = |detail: String| Error::Corrupt { path: path.to_owned(), detail };
    let (file, meta) = open_regular(path, matches!(expect, Expect::Spill(_)))?;
    let stamp = Stamp::of(&meta);
    if let Expect::Source(source) = expect {
        source.check_unchanged(&meta)?;
        source.check_stamp(stamp, names)?;
    }
    let len = meta.len();
    if len < PREFIX_LEN as u64 {
        return Err(corrupt(format!("the file is {len} bytes long, too short for a safetensors header")));
    }
    // SAFETY: a shared mapping is read-only and only read through slices that
    // do not outlive it. `write` replaces a spill file by renaming a new file
    // over it, which leaves the inode mapped here intact. Another process
    // truncating the file meanwhile is outside this module's contract: it is
    // caught when pages are populated, but racing an access to an
    // unpopulated page it would raise SIGBUS. (The mapped path maps the
    // tensors' bytes again, privately: see `map_tensors`.)
    let shared = unsafe { Mmap::map(&file) }?;
    let bytes: &[u8] = &shared;
    let (header_len, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(format!("bad header: {e}")))?;
    let data_start = PREFIX_LEN + header_len;
    let extra = metadata.metadata().as_ref();
    if let Some(version) = extra.and_then(|m| m.get(FORMAT_KEY)) {
        if version != FORMAT_VERSION {
            return Err(corrupt(format!("unknown spill format version {version:?}")));
        }
    }
    if let Expect::Spill(identity) = expect {
        identity.check(extra).map_err(corrupt)?;
    }
    let require_checksum = matches!(expect, Expect::Any { require_checksum: true } | Expect::Spill(_));

    // Check every request before allocating anything.
    let mut jobs = names
        .iter()
        .enumerate()
        .map(|(slot, name)| {
            let info =
                metadata.info(name).ok_or_else(|| corrupt(format!("no tensor `{name}` in the file")))?;
            let (kind, shape) = kind_and_shape(name, info).map_err(corrupt)?;
            let key = format!("{CHECKSUM_PREFIX}{name}");
            let checksum = match extra.and_then(|m| m.get(&key)) {
                Some(hex) => Some(
                    parse_checksum(hex)
                        .ok_or_else(|| corrupt(format!("malformed checksum {hex:?} for tensor `{name}`")))?,
                ),
                None if require_checksum => return Err(corrupt(format!("no checksum for tensor `{name}`"))),
                None => None,
            };
            let (recorded, first) = match expect {
                Expect::Source(source) => match source.state.sums.lock().get(name.as_str()) {
                    Some(&sum) => (Some(sum), false),
                    None => (None, true),
                },
                _ => (None, false),
            };
            let hash = checksum.is_some() || recorded.is_some() || first;
            let (start, end) = info.data_offsets;
            Ok(Job {
                slot,
                name,
                kind,
                shape,
                range: data_start + start..data_start + end,
                checksum,
                recorded,
                hash,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Copy in file order, so that the file is read front to back.
    jobs.sort_by_key(|job| job.range.start);
    let whole = jobs.len() == metadata.tensors().len();
    let mut dest = match how {
        How::Copy(dest) => dest,
        How::Map { verified } => {
            // A source's first read does not hash what it maps: its stamp is
            // its identity from then on (see `Source::check_stamp`).
            let first = jobs.iter().all(|job| job.recorded.is_none());
            let skip = verified == Some(stamp) || (first && matches!(expect, Expect::Source(_)));
            return map_tensors(path, &file, &jobs, skip, stamp, whole);
        }
    };
    let map = &shared;

    // A hint only: it makes a cold file's read-ahead aggressive.
    let _ = map.advise(Advice::Sequential);
    let mut copier = Copier { map, path, page: page_size(), populate: true };
    let mut out: Vec<Option<Tensor>> = names.iter().map(|_| None).collect();
    let mut sums = vec![None; names.len()];
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
        let (tensor, sum) = copier.tensor(job, given)?;
        out[job.slot] = Some(tensor);
        sums[job.slot] = sum;
    }
    let tensors = out.into_iter().map(|t| t.expect("every requested tensor was read")).collect();
    let all_hashed = sums.iter().all(Option::is_some);
    Ok(Read { tensors, sums, mapped: false, verified: (whole && all_hashed).then_some(stamp), stamp })
}

/// Compares the xxh3 `got` of `job`'s bytes with the checksum its file
/// stores and the hash recorded when its source file was first read.
fn check_hash(path: &Path, job: &Job<'_>, got: u64) -> Result<()> {
    let corrupt = |detail: String| Error::Corrupt { path: path.to_owned(), detail };
    if let Some(want) = job.checksum.filter(|&want| want != got) {
        return Err(corrupt(format!(
            "checksum mismatch for tensor `{}`: stored {want:016x}, computed {got:016x}",
            job.name
        )));
    }
    if let Some(want) = job.recorded.filter(|&want| want != got) {
        return Err(corrupt(format!(
            "the file changed after the model was loaded from it: tensor `{}` does not have the \
             bytes read then (xxh3 {want:016x} then, {got:016x} now); sire does not reload a changed file",
            job.name
        )));
    }
    Ok(())
}

/// Who a spill file belongs to: the instance (the random name of its private
/// folder), the model's id in it, and a random nonce drawn for each write.
/// Written into the file's `__metadata__`; a read accepts only a file with
/// exactly the identity of the model's last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    instance: String,
    model: u64,
    nonce: u128,
}

impl Identity {
    /// The identity's metadata entries.
    fn entries(&self) -> [(String, String); 3] {
        [
            (INSTANCE_KEY.into(), self.instance.clone()),
            (MODEL_KEY.into(), self.model.to_string()),
            (NONCE_KEY.into(), format!("{:032x}", self.nonce)),
        ]
    }

    /// Checks that a file's metadata carries this identity; the error says
    /// what differs.
    fn check(&self, extra: Option<&HashMap<String, String>>) -> std::result::Result<(), String> {
        let get = |key: &str| extra.and_then(|m| m.get(key)).map(String::as_str);
        let Some(instance) = get(INSTANCE_KEY) else {
            return Err("it names no owner: it is not a spill file this instance wrote".into());
        };
        if instance != self.instance {
            return Err(format!(
                "it belongs to another sire instance ({instance:?}; this one is {:?})",
                self.instance
            ));
        }
        let model = get(MODEL_KEY).unwrap_or("none");
        if model != self.model.to_string() {
            return Err(format!(
                "it belongs to model #{model} of this instance, not to model #{}",
                self.model
            ));
        }
        if get(NONCE_KEY) != Some(format!("{:032x}", self.nonce).as_str()) {
            return Err("it is not the file this model last wrote (its write nonce differs): it was \
                        replaced or forged"
                .into());
        }
        Ok(())
    }
}

/// A model's spill file: where it is, and which write of it is the model's.
#[derive(Debug)]
pub(crate) struct SpillFile {
    path: PathBuf,
    instance: String,
    model: u64,
    /// The nonce of the last complete write; none before the first.
    written: Option<u128>,
    /// The file's stamp when all its tensors were last verified.
    verified: parking_lot::Mutex<Option<Stamp>>,
}

impl SpillFile {
    /// The spill file of model `model` in the instance folder `dir`:
    /// `<dir>/<model>.safetensors`. The folder's name is the instance id.
    pub(crate) fn new(dir: &Path, model: u64) -> SpillFile {
        let instance = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        SpillFile {
            path: dir.join(format!("{model}.safetensors")),
            instance,
            model,
            written: None,
            verified: parking_lot::Mutex::new(None),
        }
    }

    /// Where the file is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `tensors` as the model's spill file (see [`write_with`]) under a new
    /// identity, which only this file then carries; returns its size in bytes.
    /// The folder must still be private: a directory (not a symlink) of this
    /// process's user that no one else may write to.
    pub(crate) fn write(&mut self, tensors: &[(String, Tensor)]) -> Result<u64> {
        check_private_dir(parent_dir(&self.path))?;
        let identity =
            Identity { instance: self.instance.clone(), model: self.model, nonce: ffi::random_u128()? };
        let size = write_with(&self.path, tensors, Some(&identity))?;
        self.written = Some(identity.nonce);
        *self.verified.lock() = None;
        Ok(size)
    }

    /// Reads the tensors named `names` back (see [`read_checked`]), into `dest` when
    /// given. Beyond the checks of any read, the file must belong to this
    /// process's user, have a checksum for every tensor and carry the identity
    /// of the model's last write: anything else is [`Error::Corrupt`].
    pub(crate) fn read_into(&self, names: &[String], dest: Option<Dest<'_>>) -> Result<Vec<Tensor>> {
        Ok(self.read(names, How::Copy(dest))?.tensors)
    }

    /// Maps the tensors named `names` (see [`How::Map`]), with the checks of
    /// [`SpillFile::read_into`]; their bytes are hashed only if the file
    /// changed since they last were. `None` where the file cannot be mapped.
    pub(crate) fn map(&self, names: &[String]) -> Result<Option<Vec<Tensor>>> {
        let verified = *self.verified.lock();
        let read = self.read(names, How::Map { verified })?;
        Ok(read.mapped.then_some(read.tensors))
    }

    fn read(&self, names: &[String], how: How<'_>) -> Result<Read> {
        let Some(nonce) = self.written else {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                detail: "this model never wrote a spill file".into(),
            });
        };
        let identity = Identity { instance: self.instance.clone(), model: self.model, nonce };
        let read = read_checked(&self.path, names, Expect::Spill(&identity), how)?;
        if read.verified.is_some() {
            *self.verified.lock() = read.verified;
        }
        Ok(read)
    }
}

/// A safetensors file a model was loaded from, as it was when first read:
/// its size, its modification time and the xxh3-64 of each tensor's bytes.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    /// The file (absolute, symlinks resolved when it was first read).
    path: PathBuf,
    len: u64,
    /// Modification time: seconds and nanoseconds since the epoch.
    modified: (i64, i64),
    /// What later reads check against, shared by the clones (one file).
    state: std::sync::Arc<SourceState>,
}

/// What a [`Source`]'s reads learned about its file.
#[derive(Debug, Default)]
struct SourceState {
    /// The hash of each tensor's bytes, recorded by the first read of that
    /// tensor if it copied it (a set opened from its header alone has not
    /// read them yet; a read that maps a tensor does not hash it).
    sums: parking_lot::Mutex<HashMap<String, u64>>,
    /// The file's stamp when its tensors were first read (any of them), or
    /// when they all last matched their hashes.
    verified: parking_lot::Mutex<Option<Stamp>>,
}

impl Source {
    /// Where the file is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the tensors named `names` again (see [`read_checked`]), into `dest` when
    /// given. The file must have the size and modification time it had when
    /// first read (checked before any copy) and each tensor the bytes it had
    /// then (checked as it is copied): a file that changed is
    /// [`Error::Corrupt`] naming it, and nothing read is used.
    pub(crate) fn read_into(&self, names: &[String], dest: Option<Dest<'_>>) -> Result<Vec<Tensor>> {
        Ok(self.read(names, How::Copy(dest))?.tensors)
    }

    /// Maps the tensors named `names` (see [`How::Map`]), with the checks of
    /// [`Source::read_into`]; their bytes are hashed on the first read and
    /// again only if the file's stamp changed since they last matched. `None`
    /// where the file cannot be mapped.
    pub(crate) fn map(&self, names: &[String]) -> Result<Option<Vec<Tensor>>> {
        let verified = *self.state.verified.lock();
        let read = self.read(names, How::Map { verified })?;
        Ok(read.mapped.then_some(read.tensors))
    }

    fn read(&self, names: &[String], how: How<'_>) -> Result<Read> {
        let mapping = matches!(how, How::Map { .. });
        let read = read_checked(&self.path, names, Expect::Source(self), how)?;
        if mapping && !read.mapped {
            return Ok(read);
        }
        {
            let mut verified = self.state.verified.lock();
            if verified.is_none() || read.verified.is_some() {
                // The first read: the file's stamp identifies it from now on.
                *verified = read.verified.or(Some(read.stamp));
            }
        }
        // The hashes of tensors read for the first time are the reference now
        // (a mapping hashes none: the stamp stands for them).
        let mut sums = self.state.sums.lock();
        for (name, sum) in names.iter().zip(&read.sums) {
            if let Some(sum) = sum {
                sums.entry(name.clone()).or_insert(*sum);
            }
        }
        drop(sums);
        Ok(read)
    }

    /// Refuses a file whose stamp changed since its first read if one of the
    /// tensors `names` has no recorded hash to compare (it was mapped, not
    /// copied, or never read): the stamp is then the file's identity, and
    /// any write changes it (the change time cannot be set back).
    fn check_stamp(&self, stamp: Stamp, names: &[String]) -> Result<()> {
        let sums = self.state.sums.lock();
        if names.iter().all(|n| sums.contains_key(n)) {
            return Ok(());
        }
        drop(sums);
        match *self.state.verified.lock() {
            Some(first) if first != stamp => Err(Error::Corrupt {
                path: self.path.clone(),
                detail: format!(
                    "the file changed after the model was loaded from it (its inode, size or times differ: \
                     {first:?} then, {stamp:?} now); sire does not reload a changed file"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Checks the size and modification time of the file just opened.
    fn check_unchanged(&self, meta: &fs::Metadata) -> Result<()> {
        let modified = (meta.mtime(), meta.mtime_nsec());
        if meta.len() == self.len && modified == self.modified {
            return Ok(());
        }
        Err(Error::Corrupt {
            path: self.path.clone(),
            detail: format!(
                "the file changed after the model was loaded from it (size {} then, {} now; modified \
                 at {}.{:09} then, {}.{:09} now); sire does not reload a changed file",
                self.len,
                meta.len(),
                self.modified.0,
                self.modified.1,
                modified.0,
                modified.1
            ),
        })
    }
}

/// A tensor as a file's header declares it: name, kind, shape.
pub(crate) type Declared = (String, Kind, Vec<i64>);

/// The tensors of a safetensors file (name, kind, shape, in file order) read
/// from its header alone, and the file's identity for later reads: nothing of
/// the weights is read. The first read of the tensors records their hashes
/// (see [`Source::read_into`]). A malformed header is [`Error::Corrupt`] with
/// the reason (a symlink or FIFO in place of the resolved file too); a file
/// that cannot be opened is an I/O error naming it.
pub(crate) fn open_source(path: &Path) -> Result<(Vec<Declared>, Source)> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let path = fs::canonicalize(path).map_err(named)?;
    let corrupt = |detail: String| Error::Corrupt { path: path.clone(), detail };
    let (file, meta) = open_regular(&path, false)?;
    let len = meta.len();
    if len < PREFIX_LEN as u64 {
        return Err(corrupt(format!("the file is {len} bytes long, too short for a safetensors header")));
    }
    let mut prefix = [0u8; PREFIX_LEN];
    file.read_exact_at(&mut prefix, 0).map_err(named)?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > len - PREFIX_LEN as u64 || header_len > 100 << 20 {
        return Err(corrupt(format!("bad header: a header of {header_len} bytes in a file of {len}")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, PREFIX_LEN as u64).map_err(named)?;
    let metadata: Metadata =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("bad header: {e}")))?;
    let data_len = len - PREFIX_LEN as u64 - header_len;
    let mut found = Vec::new();
    for (name, info) in metadata.tensors() {
        let (kind, shape) = kind_and_shape(&name, info).map_err(corrupt)?;
        let (start, end) = info.data_offsets;
        let want = shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
        if end < start || end as u64 > data_len || (end - start) as u64 != want {
            return Err(corrupt(format!(
                "tensor `{name}` lies at bytes {start}..{end} of a data section of {data_len}, \
                 for {want} bytes of {kind:?} {shape:?}"
            )));
        }
        found.push((start, name, kind, shape));
    }
    found.sort_by_key(|(start, ..)| *start);
    let source = Source { len, modified: (meta.mtime(), meta.mtime_nsec()), state: Default::default(), path };
    Ok((found.into_iter().map(|(_, n, k, s)| (n, k, s)).collect(), source))
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
    /// The checksum the file stores.
    checksum: Option<u64>,
    /// The hash recorded when a source file was first read.
    recorded: Option<u64>,
    /// Whether to hash the bytes as they are copied.
    hash: bool,
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
    /// its checksum and recorded hash if it has them, and releases the file's
    /// pages behind it. Returns the tensor and, if computed, its bytes' xxh3.
    fn tensor(&mut self, job: &Job<'_>, given: Option<Tensor>) -> Result<(Tensor, Option<u64>)> {
        faults::hit(Point::Copy)?;
        let corrupt = |detail: String| Error::Corrupt { path: self.path.to_owned(), detail };
        let fresh = given.is_none();
        let tensor = match given {
            Some(t) => t,
            None => Tensor::f_empty(job.shape.as_slice(), (job.kind, Device::Cpu))?,
        };
        assert_eq!(byte_len(&tensor), job.range.len(), "destination size checked by the caller");
        let mut hasher = job.hash.then(Xxh3::new);
        let dst = tensor.data_ptr().cast::<u8>();
        if fresh {
            ffi::prefer_huge_pages(dst, job.range.len());
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
        let got = hasher.map(|h| h.digest());
        if let Some(got) = got {
            check_hash(self.path, job, got)?;
        }
        Ok((tensor, got))
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

/// Parses a checksum written by [`write_with`]: exactly 16 lowercase hex digits.
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

mod dir;
mod map;
#[cfg(test)]
mod tests;
mod write;
