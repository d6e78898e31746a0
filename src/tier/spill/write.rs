//! Writing a spill file: laid out, streamed to a temporary file next to
//! it, synced and renamed into place (see the format in the parent module).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use tch::{Device, Tensor};
use xxhash_rust::xxh3::Xxh3;

use super::{
    byte_len, invalid_input, kind_to_dtype, Identity, CHECKSUM_PREFIX, CHUNK, FORMAT_KEY, FORMAT_VERSION,
    OPEN_FLAGS, PREFIX_LEN, WRITE_BUFFER,
};
use crate::error::{fmt_bytes, Error, Result};
use crate::faults::{self, Point};
use crate::tier::ffi;

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
///
/// The temporary file is created `O_EXCL | O_NOFOLLOW`, mode 0600: whatever
/// is found at `<path>.tmp` (a leftover, a symlink or a FIFO planted there) is
/// unlinked, never followed or opened, before the file is created anew. A
/// filesystem that runs out of room is an [`io::ErrorKind::StorageFull`]
/// error saying how much the file needs and how much is missing.
#[cfg(test)]
pub(crate) fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<u64> {
    write_with(path, tensors, None)
}

/// [`write`], with `identity` in the header when given.
pub(super) fn write_with(
    path: &Path,
    tensors: &[(String, Tensor)],
    identity: Option<&Identity>,
) -> Result<u64> {
    let (slots, data_len) = layout(tensors)?;
    // Checksums have a fixed width, so the header's length is known up front;
    // the real checksums are written over the placeholders at the end.
    let placeholder = header(&slots, &vec![0; slots.len()], identity)?;
    let total = (PREFIX_LEN + placeholder.len() + data_len) as u64;

    let tmp = TempFile::create(path)?;
    match fill(&tmp, &slots, &placeholder, identity) {
        Ok(()) => {}
        Err(Error::Io(e)) if is_disk_full(&e) => return Err(disk_full(&tmp, total, &e).into()),
        Err(e) => return Err(e),
    }
    faults::hit(Point::SpillRename)?;
    tmp.commit(path)?;
    Ok(total)
}

/// Writes the header and the data of `slots` to the temporary file and syncs it.
fn fill(tmp: &TempFile, slots: &[Slot<'_>], placeholder: &[u8], identity: Option<&Identity>) -> Result<()> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, &tmp.file);
    faults::hit(Point::SpillWrite)?;
    out.write_all(&(placeholder.len() as u64).to_le_bytes())?;
    out.write_all(placeholder)?;
    let checksums = slots.iter().map(|slot| write_data(&mut out, slot.tensor)).collect::<Result<Vec<_>>>()?;
    out.flush()?;
    drop(out);

    let header = header(slots, &checksums, identity)?;
    assert_eq!(header.len(), placeholder.len(), "checksums have a fixed width");
    tmp.file.write_all_at(&header, PREFIX_LEN as u64)?;
    tmp.file.sync_all()?;
    Ok(())
}

/// Whether a write failed for want of room (`ENOSPC`, or a quota's `EDQUOT`).
pub(super) fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// The error for a write of a `total`-byte file that ran out of room: how
/// much the file needs, how much room the filesystem had for it (what it
/// still reports free plus what the temporary file already holds), and how
/// much is missing.
fn disk_full(tmp: &TempFile, total: u64, e: &io::Error) -> io::Error {
    let written = tmp.file.metadata().map(|m| m.len()).unwrap_or(0);
    let free = ffi::statvfs_free(parent_dir(&tmp.path));
    let message = match free {
        Ok(free) => {
            let room = free.saturating_add(written);
            let missing = total.saturating_sub(room);
            if missing > 0 {
                format!(
                    "no space left on the device: the file needs {}, the filesystem had room for {} \
                     ({} missing) ({e})",
                    fmt_bytes(total),
                    fmt_bytes(room),
                    fmt_bytes(missing)
                )
            } else {
                format!(
                    "no space left on the device: the file needs {} and the filesystem reports {} free; \
                     a quota or reserved blocks are the limit ({e})",
                    fmt_bytes(total),
                    fmt_bytes(room)
                )
            }
        }
        Err(statvfs) => format!(
            "no space left on the device: the file needs {} (free space unknown: {statvfs}) ({e})",
            fmt_bytes(total)
        ),
    };
    io::Error::new(io::ErrorKind::StorageFull, message)
}

/// The directory holding `path` (`.` for a bare file name).
pub(super) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
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

/// The JSON header for `slots` with `checksums` (and `identity`), padded with spaces to a
/// multiple of 8 bytes so that the data starts aligned.
fn header(slots: &[Slot<'_>], checksums: &[u64], identity: Option<&Identity>) -> Result<Vec<u8>> {
    let mut extra: HashMap<String, String> = slots
        .iter()
        .zip(checksums)
        .map(|(slot, sum)| (format!("{CHECKSUM_PREFIX}{}", slot.name), format!("{sum:016x}")))
        .collect();
    extra.insert(FORMAT_KEY.into(), FORMAT_VERSION.into());
    extra.extend(identity.iter().flat_map(|id| id.entries()));
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
            faults::hit(Point::SpillWrite)?;
            hasher.update(chunk);
            out.write_all(chunk)?;
        }
    }
    Ok(hasher.digest())
}

/// The `<path>.tmp` file a spill file is written to, removed on drop unless
/// it was renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl TempFile {
    /// Creates the temporary file for `target`, mode 0600, with `O_EXCL`:
    /// never through a symlink, never opening what is there. Whatever is
    /// found at its path (a leftover of a failed write, or a symlink or FIFO
    /// planted there) is unlinked (which removes the entry itself, never
    /// what a link points to) and the file is created again, once.
    fn create(target: &Path) -> io::Result<Self> {
        let mut path = target.as_os_str().to_owned();
        path.push(".tmp");
        let path = PathBuf::from(path);
        let open = || {
            OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(OPEN_FLAGS).open(&path)
        };
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                tracing::warn!(path = %path.display(), "replacing what was found at the temporary path");
                fs::remove_file(&path)?;
                open()?
            }
            other => other?,
        };
        // Exactly 0600 whatever the umask (it can only have taken bits away).
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        Ok(Self { path, file, committed: false })
    }

    /// Renames the file over `target` and syncs the directory.
    fn commit(mut self, target: &Path) -> io::Result<()> {
        fs::rename(&self.path, target)?;
        self.committed = true;
        File::open(parent_dir(target))?.sync_all()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}
