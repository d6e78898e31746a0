//! TEMPORARY stand-in; replaced by the infra helper's module.
use std::path::{Path, PathBuf};
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) enum LoadOutcome { AlreadyLoaded, Loaded(PathBuf), NotPresent, Failed(String) }
pub(crate) fn ensure_libtorch_cuda_loaded() -> LoadOutcome { LoadOutcome::NotPresent }
#[allow(dead_code)]
pub(crate) fn statvfs_free(_p: &Path) -> std::io::Result<u64> { Ok(1 << 40) }
