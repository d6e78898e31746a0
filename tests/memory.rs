//! Spilling to disk really frees host memory: the process's resident set (from
//! `/proc/self/statm`) drops by about the model's size, and grows back on reload.
//! One test in its own binary, so no other test's allocations blur the figures.

mod common;

use common::*;
use sire::Location;

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn spilling_frees_the_resident_set() {
    let size = 256 * MIB;
    let (pools, _dir) = pools(1 << 34);
    let m = pools.manage(model(1, size)).unwrap();
    let resident = rss();
    m.offload().unwrap();
    assert_eq!(m.location(), Location::Disk);
    let spilled = rss();
    let freed = resident as i64 - spilled as i64;
    assert!(
        freed as f64 > 0.9 * size as f64,
        "spilling {} MiB freed only {} MiB of resident memory",
        size >> 20,
        freed >> 20
    );
    let g = sire::auto_manage(&m).unwrap();
    let grown = rss() as i64 - spilled as i64;
    assert!(
        grown as f64 > 0.9 * size as f64 && (grown as f64) < 1.25 * size as f64,
        "reload grew {} MiB",
        grown >> 20
    );
    drop(g);
}
