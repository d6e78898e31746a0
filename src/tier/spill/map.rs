//! The mapped path of a read ([`How::Map`](super::How::Map)): tensors that
//! point into a private, copy-on-write mapping of their file, verified first
//! where needed, and the stamp that tells whether a file changed.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use memmap2::{Advice, MmapMut, MmapOptions};
use tch::Tensor;

use super::{check_hash, Job, Read, WINDOW};
use crate::error::{Error, Result};
use crate::tier::ffi;

/// What identifies a file's contents without reading them: device, inode,
/// size, modification and change times. Any write to the file, or another
/// file put in its place, changes it (the change time cannot be set back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Stamp {
    pub(super) fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A private mapping of a file that tensors point into; unmapped when the
/// last of them is freed.
struct Mapping(#[allow(dead_code)] MmapMut);

/// Hashes of tensors (by slot) computed by one thread of [`map_tensors`].
type Hashed = Vec<(usize, Option<u64>)>;

/// Points tensors at a private mapping of `file` (at `path`) for `jobs` (see
/// [`How::Map`]), verifying their bytes first unless `skip`; `stamp` is the
/// file's, and `whole` tells whether `jobs` are all its tensors. Makes no
/// tensor (`mapped` false) where one is not aligned for its kind.
///
/// The mapping covers the bytes of `jobs` only (from the page of the first
/// to the end of the last), not the whole file: a model in many parts maps
/// its file once in all, not once a part, and the pages the kernel maps
/// around a fault stay within the tensors read (the header's page and the
/// neighbouring parts' pages are not counted in this one's resident set).
pub(super) fn map_tensors(
    path: &Path,
    file: &fs::File,
    jobs: &[Job<'_>],
    skip: bool,
    stamp: Stamp,
    whole: bool,
) -> Result<Read> {
    let corrupt = |detail: String| Error::Corrupt { path: path.to_owned(), detail };
    // The mapping starts on a page: a tensor is aligned if its offset is.
    if jobs.iter().any(|job| job.range.start % job.kind.elt_size_in_bytes() != 0) {
        return Ok(Read { tensors: Vec::new(), sums: Vec::new(), mapped: false, verified: None, stamp });
    }
    let page = super::page_size();
    let span = |f: fn(&Job<'_>) -> usize| jobs.iter().filter(|job| !job.range.is_empty()).map(f);
    let (start, end) = match (span(|job| job.range.start).min(), span(|job| job.range.end).max()) {
        (Some(start), Some(end)) => (start / page * page, end),
        // Only empty tensors: one page of the file to point them at.
        _ => (0, (stamp.len as usize).min(page)),
    };
    // SAFETY: a private mapping is copy-on-write: what is written to it never
    // reaches the file. `write` replaces a spill file by renaming a new file
    // over it, which leaves the inode mapped here intact. Another process
    // truncating the file meanwhile is outside this module's contract: it is
    // caught when pages are populated, but racing an access to an
    // unpopulated page it would raise SIGBUS. The range lies in the file
    // (its tensors' offsets were checked against its length with the header).
    let mut map = unsafe { MmapOptions::new().offset(start as u64).len(end - start).map_copy(file) }?;
    // Where each job's bytes are in the mapping.
    let at = |job: &Job<'_>| {
        if job.range.is_empty() {
            0..0
        } else {
            job.range.start - start..job.range.end - start
        }
    };
    // A hint only: a cold file's ranges are read ahead, each at once. (Not
    // `MADV_SEQUENTIAL`: on a mapping of the whole file it halved the speed
    // of populating a cold range, and slowed the compute of other threads by
    // as much, in a measurement on Linux 6.18; see BENCHMARKS.md.)
    for job in jobs.iter().filter(|job| !job.range.is_empty()) {
        let _ = map.advise_range(Advice::WillNeed, at(job).start, job.range.len());
    }
    // Tensors to verify are hashed by up to four threads, tensors dealt out
    // by size; their pages are faulted in at once first, where the kernel
    // can (a file that shrank or cannot be read is an error here, not a
    // SIGBUS). Tensors not verified are not touched: the computation faults
    // their pages in, as any mapping (populating them here measured slower).
    let prepare = |job: &Job<'_>| -> Result<Option<u64>> {
        if !job.hash || skip {
            return Ok(None);
        }
        let populated = match job.range.is_empty() {
            true => Ok(()),
            false => map.advise_range(Advice::PopulateRead, at(job).start, job.range.len()),
        };
        match populated {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(corrupt(format!("cannot read tensor `{}`: {e}", job.name))),
        }
        let got = xxhash_rust::xxh3::xxh3_64(&map[at(job)]);
        check_hash(path, job, got)?;
        Ok(Some(got))
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    let total: usize = jobs.iter().map(|job| job.range.len()).sum();
    let mut shares: Vec<Vec<&Job<'_>>> = vec![Vec::new(); threads];
    let mut loads = vec![0usize; threads];
    let mut by_size: Vec<&Job<'_>> = jobs.iter().collect();
    by_size.sort_by_key(|job| std::cmp::Reverse(job.range.len()));
    for job in by_size {
        let least = (0..threads).min_by_key(|&i| loads[i]).unwrap_or(0);
        loads[least] += job.range.len();
        shares[least].push(job);
    }
    let run = |share: &[&Job<'_>]| {
        share.iter().map(|&job| Ok((job.slot, prepare(job)?))).collect::<Result<Vec<_>>>()
    };
    let done: Vec<Result<Hashed>> = if threads == 1 || total < 16 * WINDOW {
        vec![run(&jobs.iter().collect::<Vec<_>>())]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = shares[1..].iter().map(|share| scope.spawn(|| run(share))).collect();
            let mut done = vec![run(&shares[0])];
            done.extend(
                handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            );
            done
        })
    };
    let mut sums = vec![None; jobs.len()];
    for share in done {
        for (slot, sum) in share? {
            sums[slot] = sum;
        }
    }
    let base = map.as_mut_ptr();
    let owner = std::sync::Arc::new(Mapping(map));
    let mut out: Vec<Option<Tensor>> = jobs.iter().map(|_| None).collect();
    for job in jobs {
        crate::faults::hit(crate::faults::Point::Copy)?;
        // SAFETY: `at(job)` lies inside the mapping (which spans every
        // non-empty job's range, checked against the file's length when the
        // header was read; an empty job points at its start) and is aligned
        // for `job.kind` (its file offset is, checked above, and the mapping
        // starts on a page of the file); the mapping is private and writable,
        // unmapped only when `owner`'s last reference goes, which the
        // tensor's storage holds; the ranges of a valid file do not overlap.
        let t = unsafe { ffi::tensor_over(base.add(at(job).start), &job.shape, job.kind, owner.clone()) }?;
        out[job.slot] = Some(t);
    }
    let tensors = out.into_iter().map(|t| t.expect("every requested tensor was mapped")).collect();
    let verified = (whole && (skip || sums.iter().all(Option::is_some))).then_some(stamp);
    Ok(Read { tensors, sums, mapped: true, verified, stamp })
}
