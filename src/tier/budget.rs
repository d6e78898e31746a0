//! Byte budgets: parsing overrides (`SIRE_CUDA_BUDGET`, `SIRE_CPU_BUDGET`,
//! `SIRE_DISK_BUDGET`, builder arguments) and deriving defaults from the machine.
//!
//! # Budget syntax ([`parse_budget`])
//!
//! Leading and trailing whitespace is ignored, and whitespace may separate the
//! number from its unit. Units are case-insensitive.
//!
//! | Form             | Meaning                                              |
//! |------------------|------------------------------------------------------|
//! | `123456`         | a plain integer: bytes                               |
//! | `123456B`        | bytes                                                |
//! | `6KB` `6MB` `6GB` `6TB` | decimal units: 10³, 10⁶, 10⁹, 10¹² bytes      |
//! | `6KiB` `6MiB` `6GiB` `6TiB` | binary units: 2¹⁰, 2²⁰, 2³⁰, 2⁴⁰ bytes   |
//! | `6K` `6M` `6G` `6T`, `6Ki` `6Mi` `6Gi` `6Ti` | binary units, as in `docker --memory 6g` |
//! | `1.5GB` `0.5GiB` | a decimal number with a unit, rounded down to whole bytes |
//! | `0.8`            | a number with a decimal point and no unit, in (0, 1]: that fraction of the total |
//! | `80%` `12.5%`    | a percentage in (0, 100] of the total                |
//!
//! "The total" depends on the budget: a CUDA device's total memory, the host's
//! available memory, or the spill filesystem's free space. A fraction is rejected
//! where there is no total. Zero, negative numbers, `NaN`/`inf`, exponents, empty
//! strings, unknown units, budgets that round down to 0 bytes and values beyond
//! `u64::MAX` bytes are all [`Error::InvalidBudget`].
//!
//! # Defaults
//!
//! | Pool        | Source of the total                                       | Headroom kept free          |
//! |-------------|-----------------------------------------------------------|-----------------------------|
//! | `Cuda(i)`   | NVML total memory of the device ([`nvml_totals`])         | max(1 GiB, 10% of total)    |
//! | `Cpu`       | available host memory, the cgroup's remaining memory where lower ([`host_available`]) | max(512 MiB, 10%) |
//! | `Disk`      | free space of the spill directory's filesystem ([`disk_free`]) | max(1 GiB, 5%)         |

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// At most this many digits after the decimal point are used (further digits
/// are dropped, which can lower a result by at most one byte for totals below
/// 10¹⁸; results are rounded down anyway). Keeps the arithmetic in `u128`.
const MAX_FRACTION_DIGITS: u32 = 18;

/// A non-negative decimal number, exactly: `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    mantissa: u128,
    scale: u32,
    has_point: bool,
}

impl Decimal {
    fn is_zero(self) -> bool {
        self.mantissa == 0
    }

    /// `floor(self * factor / divisor)`, or `None` on overflow of `u128`.
    fn mul_div(self, factor: u128, divisor: u128) -> Option<u128> {
        let den = 10u128.checked_pow(self.scale)?.checked_mul(divisor)?;
        Some(self.mantissa.checked_mul(factor)? / den)
    }

    /// `self <= limit` for an integer limit.
    fn at_most(self, limit: u128) -> bool {
        match 10u128.checked_pow(self.scale).and_then(|p| p.checked_mul(limit)) {
            Some(bound) => self.mantissa <= bound,
            None => true, // bound beyond u128 while mantissa fits: certainly below
        }
    }
}

/// Parses `digits[.digits]` (at least one digit in all); `Err` carries a reason.
fn parse_decimal(s: &str) -> std::result::Result<Decimal, String> {
    let (int, frac, has_point) = match s.split_once('.') {
        Some((i, f)) => (i, f, true),
        None => (s, "", false),
    };
    if int.is_empty() && frac.is_empty() {
        return Err("expected a number before the unit".into());
    }
    if frac.contains('.') {
        return Err("more than one decimal point".into());
    }
    let too_large = || "the number is too large".to_string();
    let mut mantissa: u128 = 0;
    let mut scale = 0;
    let digits = int.bytes().map(|d| (d, true)).chain(frac.bytes().map(|d| (d, false)));
    for (d, integral) in digits {
        debug_assert!(d.is_ascii_digit());
        if !integral {
            if scale == MAX_FRACTION_DIGITS {
                break;
            }
            scale += 1;
        }
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(d - b'0')))
            .ok_or_else(too_large)?;
    }
    Ok(Decimal { mantissa, scale, has_point })
}

/// The multiplier of a (lower-cased, trimmed) byte unit.
fn unit_multiplier(unit: &str) -> Option<u64> {
    Some(match unit {
        "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "ki" | "kib" => KIB,
        "m" | "mi" | "mib" => MIB,
        "g" | "gi" | "gib" => GIB,
        "t" | "ti" | "tib" => 1 << 40,
        _ => return None,
    })
}

/// Parses a byte budget; see the [module documentation](self) for the syntax.
///
/// `name` says where the value came from (an environment variable or a builder
/// method) and appears in the error. `total` is what fractions (`0.8`) and
/// percentages (`80%`) are taken of; with `None` they are rejected.
pub(crate) fn parse_budget(name: &str, value: &str, total: Option<u64>) -> Result<u64> {
    let err =
        |reason: String| Error::InvalidBudget { name: name.to_string(), value: value.to_string(), reason };
    let s = value.trim();
    if s.is_empty() {
        return Err(err("the value is empty".into()));
    }
    let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(num_end);
    let unit = unit.trim().to_ascii_lowercase();
    if num.is_empty() {
        let lower = s.to_ascii_lowercase();
        let reason = if s.starts_with('-') {
            "a budget must be positive".to_string()
        } else if lower.starts_with("nan") || lower.starts_with("inf") || lower.starts_with("+inf") {
            "not a finite number".to_string()
        } else {
            "expected a number".to_string()
        };
        return Err(err(reason));
    }
    let number = parse_decimal(num).map_err(&err)?;
    if number.is_zero() {
        return Err(err("a budget must be greater than zero".into()));
    }
    let too_large = || err(format!("more than {} bytes", u64::MAX));
    let need_total = |what: &str| {
        total.ok_or_else(|| err(format!("{what} of a total is not allowed here; give a size such as `6GiB`")))
    };

    let bytes: u128 = match unit.as_str() {
        "" if !number.has_point => number.mantissa,
        "" => {
            let total = need_total("a fraction")?;
            if !number.at_most(1) {
                return Err(err(
                    "a number with a decimal point and no unit is a fraction of the total and must \
                     be in (0, 1]; add a unit (e.g. `GiB`) for a size"
                        .into(),
                ));
            }
            number.mul_div(u128::from(total), 1).ok_or_else(too_large)?
        }
        "%" => {
            let total = need_total("a percentage")?;
            if !number.at_most(100) {
                return Err(err("a percentage must be in (0, 100]".into()));
            }
            number.mul_div(u128::from(total), 100).ok_or_else(too_large)?
        }
        u => {
            let Some(mult) = unit_multiplier(u) else {
                let shown = s[num_end..].trim();
                let exponent = shown
                    .strip_prefix(['e', 'E'])
                    .map(|rest| rest.trim_start_matches(['+', '-']))
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
                return Err(err(if exponent {
                    "exponents are not supported; use a unit such as `GB`".into()
                } else {
                    format!("unknown unit `{shown}` (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or %)")
                }));
            };
            number.mul_div(u128::from(mult), 1).ok_or_else(too_large)?
        }
    };
    let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
    if bytes == 0 {
        let of = match total {
            Some(t) if unit.is_empty() || unit == "%" => format!(" of a total of {t} bytes"),
            _ => String::new(),
        };
        return Err(err(format!("the budget rounds down to 0 bytes{of}")));
    }
    Ok(bytes)
}

/// Reads the environment variable `var` and parses it with [`parse_budget`]
/// (`total` as there). `Ok(None)` when it is unset or empty (blank).
pub(crate) fn budget_from_env(var: &str, total: Option<u64>) -> Result<Option<u64>> {
    budget_from_var(var, std::env::var(var), total)
}

/// [`budget_from_env`] given the variable's lookup result (testable without
/// touching the process environment, which other threads may be reading).
fn budget_from_var(
    var: &str,
    value: std::result::Result<String, std::env::VarError>,
    total: Option<u64>,
) -> Result<Option<u64>> {
    match value {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => parse_budget(var, &v, total).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::InvalidBudget {
            name: var.to_string(),
            value: v.to_string_lossy().into_owned(),
            reason: "the value is not valid UTF-8".into(),
        }),
    }
}

// ---------------------------------------------------------------------------
// CUDA

/// Total memory of CUDA devices `0..count` (CUDA's numbering, as in
/// `tch::Device::Cuda(i)`), read through NVML.
///
/// NVML numbers devices by PCI bus order and ignores `CUDA_VISIBLE_DEVICES`, so
/// CUDA ordinals are mapped to NVML devices here:
/// - `CUDA_VISIBLE_DEVICES` entries that are UUIDs (`GPU-…`, unique prefixes
///   allowed) name one device exactly.
/// - With `CUDA_DEVICE_ORDER=PCI_BUS_ID`, integer entries (and, without
///   `CUDA_VISIBLE_DEVICES`, the ordinals themselves) are NVML indices.
/// - Otherwise CUDA's default order (`FASTEST_FIRST`) may differ from the PCI
///   order, so ordinal `i` may be any device: every device is given the smallest
///   total on the machine. Exact on machines whose GPUs are all alike, never too
///   large on mixed ones.
///
/// `Err` with a readable message when NVML cannot be loaded or asked (no NVIDIA
/// driver, `libnvidia-ml.so.1` missing, MIG instances, fewer devices than
/// `count`); the caller then needs another source (or an explicit budget).
pub(crate) fn nvml_totals(count: usize) -> std::result::Result<Vec<u64>, String> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let nvml =
        nvml_wrapper::Nvml::init().map_err(|e| format!("cannot initialise NVML (libnvidia-ml.so.1): {e}"))?;
    let n = nvml.device_count().map_err(|e| format!("NVML cannot count devices: {e}"))?;
    let mut physical = Vec::with_capacity(n as usize);
    for i in 0..n {
        let dev = nvml.device_by_index(i).map_err(|e| format!("NVML cannot open device {i}: {e}"))?;
        let uuid = dev.uuid().unwrap_or_default();
        let total =
            dev.memory_info().map_err(|e| format!("NVML cannot read the memory of device {i}: {e}"))?.total;
        physical.push((uuid, total));
    }
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let order = std::env::var("CUDA_DEVICE_ORDER").ok();
    map_cuda_totals(count, &physical, visible.as_deref(), order.as_deref())
}

/// The pure part of [`nvml_totals`]: `physical` is `(uuid, total)` per NVML index.
fn map_cuda_totals(
    count: usize,
    physical: &[(String, u64)],
    visible: Option<&str>,
    order: Option<&str>,
) -> std::result::Result<Vec<u64>, String> {
    let pci_order = order.is_some_and(|o| o.trim() == "PCI_BUS_ID");
    // NVML index of each CUDA-visible device, where it is certain.
    let mut exact: Vec<usize> = Vec::new();
    // Some ordinal's device is uncertain (FASTEST_FIRST order with integer indices).
    let mut uncertain = false;
    match visible {
        None => {
            exact = (0..physical.len()).collect();
            uncertain = !pci_order;
        }
        Some(list) => {
            // CUDA stops at the first entry it cannot use.
            for entry in list.split(',').map(str::trim) {
                if entry.starts_with("MIG-") {
                    return Err(format!(
                        "CUDA_VISIBLE_DEVICES names a MIG instance ({entry}); NVML reports the \
                         parent GPU's memory, not the instance's"
                    ));
                }
                let found = if let Ok(i) = entry.parse::<usize>() {
                    uncertain |= !pci_order;
                    (i < physical.len()).then_some(i)
                } else if entry.starts_with("GPU-") {
                    let mut matches = (0..physical.len()).filter(|&i| physical[i].0.starts_with(entry));
                    match (matches.next(), matches.next()) {
                        (Some(i), None) => Some(i),
                        _ => None, // unknown or ambiguous prefix
                    }
                } else {
                    None
                };
                match found {
                    Some(i) if !exact.contains(&i) => exact.push(i),
                    _ => break,
                }
            }
        }
    }
    if exact.len() < count {
        return Err(format!("CUDA reports {count} device(s) but NVML finds {} matching ones", exact.len()));
    }
    if uncertain {
        // CUDA's ordinals may name other devices than NVML's indices: use a
        // bound that holds for every device on the machine.
        let min = physical.iter().map(|p| p.1).min().unwrap_or(0);
        return Ok(vec![min; count]);
    }
    Ok(exact[..count].iter().map(|&i| physical[i].1).collect())
}

/// Default budget of a CUDA device with `total` bytes: the total minus a
/// headroom of max(1 GiB, 10% of the total) for activations, the CUDA context
/// and the caching allocator's fragmentation. 0 for devices of 1 GiB or less.
pub(crate) fn default_cuda_budget(total: u64) -> u64 {
    total.saturating_sub(GIB.max(total / 10))
}

// ---------------------------------------------------------------------------
// Host memory

/// Host memory the pools may use now: `sysinfo`'s available memory, or the
/// memory the process's cgroup has left where that is lower.
///
/// A cgroup's remaining memory is its limit (v2: the lower of `memory.max` and
/// `memory.high`; v1: `memory.limit_in_bytes`) minus its usage, not counting
/// inactive page cache (`inactive_file`), which the kernel reclaims before it
/// runs out; the lowest value over the cgroup and its ancestors wins.
pub(crate) fn host_available() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let available = sys.available_memory();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|procfile| cgroup_remaining(&procfile, Path::new("/sys/fs/cgroup")));
    match cgroup {
        Some(c) => available.min(c),
        None => available,
    }
}

/// Default host budget: `available` minus max(512 MiB, 10% of it).
pub(crate) fn default_cpu_budget(available: u64) -> u64 {
    available.saturating_sub((512 * MIB).max(available / 10))
}

/// Limits at or above this are "no limit" (cgroup v1 writes `PAGE_COUNTER_MAX`
/// rounded to pages, about 2⁶³).
const CGROUP_UNLIMITED: u64 = 1 << 60;

/// Remaining memory of the cgroup described by `proc_self_cgroup` (the text of
/// `/proc/self/cgroup`), with the cgroup filesystems mounted under `root`
/// (normally `/sys/fs/cgroup`). `None` where no limit applies or none is found.
fn cgroup_remaining(proc_self_cgroup: &str, root: &Path) -> Option<u64> {
    let mut best: Option<u64> = None;
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let (mount, v2) = if id == "0" && controllers.is_empty() {
            // Unified hierarchy: /sys/fs/cgroup itself (pure v2) or .../unified (hybrid).
            if root.join("cgroup.controllers").exists() {
                (root.to_path_buf(), true)
            } else {
                (root.join("unified"), true)
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), false)
        } else {
            continue;
        };
        for dir in cgroup_dirs(&mount, rel) {
            let remaining = if v2 { cgroup_v2_remaining(&dir) } else { cgroup_v1_remaining(&dir) };
            if let Some(r) = remaining {
                best = Some(best.map_or(r, |b| b.min(r)));
            }
        }
    }
    best
}

/// The existing directories from `mount/rel` up to `mount`. When the process's
/// path does not exist under the mount (a container that bind-mounts its own
/// cgroup as the root without a cgroup namespace), the mount itself remains.
fn cgroup_dirs(mount: &Path, rel: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut dir = mount.join(rel);
    loop {
        if dir.is_dir() {
            dirs.push(dir.clone());
        }
        if dir == mount || !dir.pop() {
            break;
        }
    }
    dirs
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a `memory.stat` file.
fn stat_value(dir: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn remaining(limit: u64, usage: u64, reclaimable: u64) -> Option<u64> {
    (limit < CGROUP_UNLIMITED).then(|| limit.saturating_sub(usage.saturating_sub(reclaimable)))
}

fn cgroup_v2_remaining(dir: &Path) -> Option<u64> {
    // `max` (no limit) does not parse and counts as none.
    let max = read_u64(&dir.join("memory.max"));
    let high = read_u64(&dir.join("memory.high"));
    let limit = match (max, high) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let usage = read_u64(&dir.join("memory.current"))?;
    remaining(limit, usage, stat_value(dir, "inactive_file").unwrap_or(0))
}

fn cgroup_v1_remaining(dir: &Path) -> Option<u64> {
    let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
    let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
    let inactive =
        stat_value(dir, "total_inactive_file").or_else(|| stat_value(dir, "inactive_file")).unwrap_or(0);
    remaining(limit, usage, inactive)
}

// ---------------------------------------------------------------------------
// Disk

/// Free bytes (for unprivileged users) of the filesystem holding `dir`. When
/// `dir` does not exist yet, its nearest existing ancestor is asked (the spill
/// directory is created on first use).
pub(crate) fn disk_free(dir: &Path) -> std::io::Result<u64> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe = p,
            _ => {
                probe = Path::new(".");
                break;
            }
        }
    }
    crate::tier::ffi::statvfs_free(probe)
}

/// Default disk budget: `free` minus max(1 GiB, 5% of it).
pub(crate) fn default_disk_budget(free: u64) -> u64 {
    free.saturating_sub(GIB.max(free / 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: &str) -> u64 {
        parse_budget("TEST", v, None).unwrap_or_else(|e| panic!("{v:?}: {e}"))
    }

    fn ok_of(v: &str, total: u64) -> u64 {
        parse_budget("TEST", v, Some(total)).unwrap_or_else(|e| panic!("{v:?}: {e}"))
    }

    fn reason(v: &str, total: Option<u64>) -> String {
        match parse_budget("TEST_VAR", v, total) {
            Err(Error::InvalidBudget { name, value, reason }) => {
                assert_eq!(name, "TEST_VAR");
                assert_eq!(value, v);
                reason
            }
            other => panic!("{v:?}: expected InvalidBudget, got {other:?}"),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(ok("123456"), 123_456);
        assert_eq!(ok("1"), 1);
        assert_eq!(ok("6GiB"), 6 * GIB);
        assert_eq!(ok("6000MB"), 6_000_000_000);
        assert_eq!(ok("512 MiB"), 512 * MIB);
        assert_eq!(ok("1.5GB"), 1_500_000_000);
        assert_eq!(ok("1.5GiB"), 3 * GIB / 2);
        assert_eq!(ok("  2 tib  "), 2 << 40);
        assert_eq!(ok("2TB"), 2_000_000_000_000);
        assert_eq!(ok("100b"), 100);
        assert_eq!(ok("3kb"), 3000);
        assert_eq!(ok("3KiB"), 3072);
        assert_eq!(ok("6g"), 6 * GIB);
        assert_eq!(ok("6G"), 6 * GIB);
        assert_eq!(ok("6Gi"), 6 * GIB);
        assert_eq!(ok("4k"), 4096);
        assert_eq!(ok("7M"), 7 * MIB);
        assert_eq!(ok("1T"), 1 << 40);
        assert_eq!(ok(".5GiB"), GIB / 2);
        assert_eq!(ok("0.1KiB"), 102); // 102.4, rounded down
        assert_eq!(ok("18446744073709551615"), u64::MAX);
        assert_eq!(ok("00012MB"), 12_000_000);
    }

    #[test]
    fn fractions_and_percentages() {
        let total = 80 * GIB;
        assert_eq!(ok_of("0.8", total), 64 * GIB);
        assert_eq!(ok_of("1.0", total), total);
        assert_eq!(ok_of("1.", total), total);
        assert_eq!(ok_of(".25", total), 20 * GIB);
        assert_eq!(ok_of("80%", total), 64 * GIB);
        assert_eq!(ok_of("80 %", total), 64 * GIB);
        assert_eq!(ok_of("100%", total), total);
        assert_eq!(ok_of("12.5%", 1000), 125);
        assert_eq!(ok_of("0.5", u64::MAX), u64::MAX / 2);
        assert_eq!(ok_of("1.0", u64::MAX), u64::MAX);
        assert_eq!(ok_of("0.333", 1000), 333);
        // Many digits are accepted; the result rounds down.
        assert_eq!(ok_of("0.99999999999999999999999999", 1000), 999);
        // Sizes ignore the total.
        assert_eq!(ok_of("6GiB", total), 6 * GIB);
        assert_eq!(ok_of("123", total), 123);
    }

    #[test]
    fn rejected() {
        for v in ["", "   ", "\t"] {
            assert!(reason(v, None).contains("empty"), "{v:?}");
        }
        for v in ["0", "0GiB", "0.0", "0%", "0.000"] {
            assert!(reason(v, Some(100)).contains("greater than zero"), "{v:?}");
        }
        for v in ["-1", "-6GiB", "-0.5"] {
            assert!(reason(v, Some(100)).contains("positive"), "{v:?}");
        }
        for v in ["NaN", "nan", "inf", "Infinity", "+inf"] {
            assert!(reason(v, Some(100)).contains("finite"), "{v:?}");
        }
        for v in ["GiB", "abc", "+5GiB", "~3"] {
            assert!(reason(v, Some(100)).contains("expected a number"), "{v:?}");
        }
        for v in ["6XB", "6 gigs", "6GiB extra", "6 G i B", "6PB", "6/GiB"] {
            assert!(reason(v, Some(100)).contains("unknown unit"), "{v:?}");
        }
        assert!(reason("1e9", None).contains("exponents"));
        assert!(reason("1E+9", None).contains("exponents"));
        assert!(reason("6EB", None).contains("unknown unit"));
        assert!(reason("6é", None).contains("unknown unit")); // multi-byte unit: no slicing panic
        assert!(reason("6e", None).contains("unknown unit"));
        assert!(reason("1.2.3", None).contains("decimal point"));
        assert!(reason("1..5GB", None).contains("decimal point"));
        assert!(reason(".", None).contains("expected a number"));
        // Fractions need a total.
        assert!(reason("0.8", None).contains("not allowed here"));
        assert!(reason("80%", None).contains("not allowed here"));
        // Out of range fractions / percentages.
        assert!(reason("1.5", Some(100)).contains("(0, 1]"));
        assert!(reason("1.0000001", Some(100)).contains("(0, 1]"));
        assert!(reason("100.5%", Some(100)).contains("(0, 100]"));
        assert!(reason("250%", Some(100)).contains("(0, 100]"));
        // Rounds to zero.
        assert!(reason("0.1B", None).contains("0 bytes"));
        assert!(reason("0.001", Some(100)).contains("0 bytes of a total of 100"));
        assert!(reason("50%", Some(1)).contains("0 bytes"));
        // Overflow.
        assert!(reason("18446744073709551616", None).contains("more than"));
        assert!(reason("17179869184GiB", None).contains("more than"));
        assert!(reason("99999999999999999999999999999TB", None).contains("more than"));
        assert!(reason(&"9".repeat(60), None).contains("too large"));
    }

    proptest::proptest! {
        #[test]
        fn any_integer_is_bytes(n in 1u64..) {
            proptest::prop_assert_eq!(parse_budget("T", &n.to_string(), None).unwrap(), n);
        }

        #[test]
        fn binary_and_decimal_units(n in 1u64..(1 << 24), spaces in " {0,2}") {
            let gib = parse_budget("T", &format!("{n}{spaces}GiB"), None).unwrap();
            proptest::prop_assert_eq!(gib, n << 30);
            let mb = parse_budget("T", &format!("{n}{spaces}mb"), None).unwrap();
            proptest::prop_assert_eq!(mb, n * 1_000_000);
        }

        #[test]
        fn fractions_never_exceed_the_total(
            total in 1u64..,
            millis in 1u32..=1000,
        ) {
            let v = format!("{}.{:03}", millis / 1000, millis % 1000);
            match parse_budget("T", &v, Some(total)) {
                Ok(b) => {
                    proptest::prop_assert!(b <= total);
                    let exact = u128::from(total) * u128::from(millis) / 1000;
                    proptest::prop_assert_eq!(u128::from(b), exact);
                }
                Err(Error::InvalidBudget { reason, .. }) => {
                    proptest::prop_assert!(reason.contains("0 bytes"), "{}", reason);
                }
                Err(e) => proptest::prop_assert!(false, "{}", e),
            }
        }

        #[test]
        fn arbitrary_text_never_panics(v in "[ 0-9.%kmgtibKMGTIB+eE-]{0,10}|\\PC{0,12}", total in proptest::option::of(0u64..)) {
            let _ = parse_budget("T", &v, total);
        }
    }

    #[test]
    fn error_message_names_variable_and_value() {
        let e = parse_budget("SIRE_CUDA_BUDGET", "6 potatoes", None).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("SIRE_CUDA_BUDGET"), "{msg}");
        assert!(msg.contains("6 potatoes"), "{msg}");
        assert!(msg.contains("potatoes"), "{msg}");
    }

    #[test]
    fn from_env() {
        use std::env::VarError;
        let var = "SIRE_TEST_BUDGET";
        let set = |v: &str| Ok(v.to_string());
        assert_eq!(budget_from_var(var, Err(VarError::NotPresent), None).unwrap(), None);
        assert_eq!(budget_from_var(var, set(""), None).unwrap(), None);
        assert_eq!(budget_from_var(var, set("  "), None).unwrap(), None);
        assert_eq!(budget_from_var(var, set("6GiB"), None).unwrap(), Some(6 * GIB));
        assert_eq!(budget_from_var(var, set("0.5"), Some(1000)).unwrap(), Some(500));
        match budget_from_var(var, set("0.5"), None) {
            Err(Error::InvalidBudget { name, .. }) => assert_eq!(name, var),
            other => panic!("{other:?}"),
        }
        assert!(budget_from_var(var, set("lots"), Some(1000)).is_err());
        {
            use std::os::unix::ffi::OsStringExt;
            let bad = std::ffi::OsString::from_vec(b"6\xffGiB".to_vec());
            match budget_from_var(var, Err(VarError::NotUnicode(bad)), None) {
                Err(Error::InvalidBudget { reason, .. }) => assert!(reason.contains("UTF-8")),
                other => panic!("{other:?}"),
            }
        }
        // The real environment, read only (setting variables while libtorch's
        // threads may call getenv is not sound).
        assert_eq!(budget_from_env("SIRE_TEST_BUDGET_SURELY_UNSET_5f1c", None).unwrap(), None);
    }

    #[test]
    fn default_rules() {
        // CUDA: max(1 GiB, 10%).
        assert_eq!(default_cuda_budget(80 * GIB), 72 * GIB);
        assert_eq!(default_cuda_budget(8 * GIB), 7 * GIB);
        assert_eq!(default_cuda_budget(10 * GIB), 9 * GIB);
        assert_eq!(default_cuda_budget(GIB), 0);
        assert_eq!(default_cuda_budget(0), 0);
        // Host: max(512 MiB, 10%).
        assert_eq!(default_cpu_budget(100 * GIB), 90 * GIB);
        assert_eq!(default_cpu_budget(4 * GIB), 4 * GIB - 512 * MIB);
        assert_eq!(default_cpu_budget(100 * MIB), 0);
        // Disk: max(1 GiB, 5%).
        assert_eq!(default_disk_budget(100 * GIB), 95 * GIB);
        assert_eq!(default_disk_budget(10 * GIB), 9 * GIB);
        assert_eq!(default_disk_budget(GIB / 2), 0);
        assert_eq!(default_disk_budget(u64::MAX), u64::MAX - u64::MAX / 20);
    }

    #[test]
    fn cuda_ordinals_map_to_nvml_devices() {
        let phys = |totals: &[u64]| -> Vec<(String, u64)> {
            totals.iter().enumerate().map(|(i, &t)| (format!("GPU-{i}{i}{i}-uuid"), t)).collect()
        };
        let same = phys(&[80, 80, 80]);
        let mixed = phys(&[80, 24, 48]);
        assert!(map_cuda_totals(0, &mixed, None, None).unwrap().is_empty());
        assert_eq!(map_cuda_totals(3, &same, None, None).unwrap(), vec![80; 3]);
        // Order not pinned and sizes differ: the smallest for all.
        assert_eq!(map_cuda_totals(3, &mixed, None, None).unwrap(), vec![24; 3]);
        assert_eq!(map_cuda_totals(2, &mixed, None, None).unwrap(), vec![24; 2]);
        // PCI order: exact.
        assert_eq!(map_cuda_totals(3, &mixed, None, Some("PCI_BUS_ID")).unwrap(), vec![80, 24, 48]);
        assert_eq!(map_cuda_totals(2, &mixed, Some("2,0"), Some("PCI_BUS_ID")).unwrap(), vec![48, 80]);
        // Integer indices in CUDA's default order may name any device.
        assert_eq!(map_cuda_totals(2, &mixed, Some("0,2"), None).unwrap(), vec![24, 24]);
        // UUIDs (prefixes too) are exact whatever the order.
        assert_eq!(map_cuda_totals(2, &mixed, Some("GPU-222,GPU-111-uuid"), None).unwrap(), vec![48, 24]);
        // CUDA stops at the first bad entry.
        assert!(map_cuda_totals(2, &mixed, Some("1,7,0"), None).is_err());
        assert_eq!(map_cuda_totals(1, &mixed, Some("1,7,0"), Some("PCI_BUS_ID")).unwrap(), vec![24]);
        assert!(map_cuda_totals(1, &mixed, Some(""), None).is_err());
        assert!(map_cuda_totals(1, &mixed, Some("-1"), None).is_err());
        assert!(map_cuda_totals(1, &mixed, Some("MIG-abc"), None).unwrap_err().contains("MIG"));
        assert!(map_cuda_totals(4, &mixed, None, None).unwrap_err().contains("4 device"));
        // Ambiguous UUID prefix: not a device.
        let twins = vec![("GPU-aa1".to_string(), 1), ("GPU-aa2".to_string(), 2)];
        assert!(map_cuda_totals(1, &twins, Some("GPU-aa"), None).is_err());
    }

    #[test]
    fn nvml_without_devices_asked_for_is_empty() {
        assert_eq!(nvml_totals(0).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn nvml_totals_agree_with_tch() {
        let count = tch::Cuda::device_count() as usize;
        match nvml_totals(count.max(1)) {
            Ok(t) => {
                assert!(t.len() == count.max(1) && t.iter().all(|&b| b > GIB), "{t:?}")
            }
            // No driver on this machine: a clear message, not a panic.
            Err(msg) => {
                assert_eq!(count, 0, "CUDA sees {count} device(s) but NVML failed: {msg}");
                assert!(!msg.is_empty());
            }
        }
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn cgroup_v2() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write(&r.join("cgroup.controllers"), "cpu memory\n");
        write(&r.join("memory.stat"), "anon 1\n");
        // Parent: 8 GiB limit, 7 GiB used of which 2 GiB inactive cache -> 3 GiB left.
        let parent = r.join("user.slice");
        write(&parent.join("memory.max"), &format!("{}\n", 8 * GIB));
        write(&parent.join("memory.high"), "max\n");
        write(&parent.join("memory.current"), &format!("{}\n", 7 * GIB));
        write(
            &parent.join("memory.stat"),
            &format!("anon 5\nfile 9\ninactive_file {}\nactive_file 3\n", 2 * GIB),
        );
        // Leaf: no max, high 6 GiB, 1 GiB used -> 5 GiB left, but the parent wins.
        let leaf = parent.join("job");
        write(&leaf.join("memory.max"), "max\n");
        write(&leaf.join("memory.high"), &format!("{}\n", 6 * GIB));
        write(&leaf.join("memory.current"), &format!("{}\n", GIB));
        write(&leaf.join("memory.stat"), "inactive_file 0\n");
        let procfile = "0::/user.slice/job\n";
        assert_eq!(cgroup_remaining(procfile, r), Some(3 * GIB));
        // Parent limit lifted: the leaf's memory.high counts.
        write(&parent.join("memory.max"), "max\n");
        assert_eq!(cgroup_remaining(procfile, r), Some(5 * GIB));
        // No limits anywhere.
        write(&leaf.join("memory.high"), "max\n");
        assert_eq!(cgroup_remaining(procfile, r), None);
        // Over the limit: 0, not an underflow.
        write(&leaf.join("memory.max"), &format!("{}\n", GIB / 2));
        assert_eq!(cgroup_remaining(procfile, r), Some(0));
        // Path not visible (no cgroup namespace, own cgroup bind-mounted at the root).
        write(&r.join("memory.max"), &format!("{}\n", 4 * GIB));
        write(&r.join("memory.current"), &format!("{}\n", GIB));
        assert_eq!(cgroup_remaining("0::/docker/abc123\n", r), Some(3 * GIB));
    }

    #[test]
    fn cgroup_v1() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let unlimited = "9223372036854771712\n";
        let mem = r.join("memory");
        write(&mem.join("memory.limit_in_bytes"), unlimited);
        write(&mem.join("memory.usage_in_bytes"), &format!("{}\n", 20 * GIB));
        let leaf = mem.join("process_api/abc");
        write(&leaf.join("memory.limit_in_bytes"), &format!("{}\n", 16 * GIB));
        write(&leaf.join("memory.usage_in_bytes"), &format!("{}\n", 10 * GIB));
        write(
            &leaf.join("memory.stat"),
            &format!("cache 1\ninactive_file 5\ntotal_inactive_file {}\n", 2 * GIB),
        );
        let procfile = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/\n";
        assert_eq!(cgroup_remaining(procfile, r), Some(8 * GIB));
        write(&leaf.join("memory.limit_in_bytes"), unlimited);
        assert_eq!(cgroup_remaining(procfile, r), None);
        // Controller lists with memory among others.
        write(&leaf.join("memory.limit_in_bytes"), &format!("{}\n", 11 * GIB));
        assert_eq!(cgroup_remaining("5:cpuset,memory:/process_api/abc\n", r), Some(3 * GIB));
        // No memory controller at all.
        assert_eq!(cgroup_remaining("1:cpu:/\n", r), None);
        assert_eq!(cgroup_remaining("", r), None);
        assert_eq!(cgroup_remaining("garbage", r), None);
    }

    #[test]
    fn host_memory() {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        let avail = host_available();
        assert!(avail > 0);
        assert!(avail <= sys.total_memory(), "{avail} > {}", sys.total_memory());
        assert!(default_cpu_budget(avail) < avail);
    }

    #[test]
    fn disk() {
        let dir = tempfile::tempdir().unwrap();
        let free = disk_free(dir.path()).unwrap();
        assert!(free > 0);
        // A spill directory that does not exist yet: its filesystem is asked.
        let later = dir.path().join("not/yet/created");
        let free_later = disk_free(&later).unwrap();
        assert!(free_later > 0);
        let diff = free.abs_diff(free_later);
        assert!(diff < GIB, "{free} vs {free_later}");
        assert!(disk_free(Path::new("relative/does/not/exist")).unwrap() > 0);
        assert!(default_disk_budget(free) < free);
    }
}
