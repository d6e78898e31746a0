//! The `sire` command: devices and pools, the model catalogue, the caches.
//!
//! Exit codes: 0 success; 1 failure (network, HTTP, checksum, I/O, a
//! refused file); 2 usage (bad arguments, no or broken catalogue, unknown
//! key, unusable catalogue entry); 3 not available (`validate` found a model
//! whose files are missing or do not match, `path` of a model not in the
//! cache). Results go to standard output (JSON with `--json`), errors and
//! warnings to standard error as `sire: error: ...` / `sire: warning: ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use sire::registry::{Filter, ModelType, Registry};
use sire::{Error, Location};

#[derive(Parser)]
#[command(name = "sire", version, about = "Devices, model catalogue and caches of sire")]
struct Cli {
    /// A catalogue file; repeat to merge several (a later entry replaces an
    /// earlier one with the same key). Default: $SIRE_CATALOGUE (`:`-separated).
    #[arg(long = "catalogue", short = 'c', global = true, value_name = "FILE")]
    catalogues: Vec<PathBuf>,
    /// Print results as JSON on standard output.
    #[arg(long, global = true)]
    json: bool,
    /// Accept files the catalogue gives no sha256 for.
    #[arg(long, global = true)]
    allow_unhashed: bool,
    /// Accept pickle-based weight files (they can run code when loaded).
    #[arg(long, global = true)]
    allow_pickle: bool,
    /// Largest file a download may bring (`20GiB`, `500MB`, bytes).
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,
    /// No progress bars.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pools, budgets and what the driver reports.
    Devices,
    /// The models of the catalogue.
    Models {
        #[command(subcommand)]
        command: Models,
    },
    /// What the caches hold, and what is shared with Hugging Face's cache.
    Cache,
}

#[derive(Subcommand)]
enum Models {
    /// Lists the models, with whether each is available in the cache.
    List {
        /// Only models of this type (torchscript, safetensors, lora, ...).
        #[arg(long = "type", value_name = "TYPE")]
        model_type: Option<String>,
        /// Only models available in the cache.
        #[arg(long, conflicts_with = "missing")]
        available: bool,
        /// Only models not available in the cache.
        #[arg(long)]
        missing: bool,
        /// Only models whose metadata field KEY is VALUE (repeatable).
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
        /// Only models whose key, name or description contains TEXT.
        #[arg(long, value_name = "TEXT")]
        search: Option<String>,
    },
    /// Downloads models (their files are checked against their sha256).
    Download {
        /// The models' keys.
        #[arg(required_unless_present = "all")]
        keys: Vec<String>,
        /// Every model of the catalogue.
        #[arg(long, conflicts_with = "keys")]
        all: bool,
    },
    /// Checks the models' files on disk against the catalogue (no network).
    Validate {
        /// The models' keys.
        #[arg(required_unless_present = "all")]
        keys: Vec<String>,
        /// Every model of the catalogue.
        #[arg(long, conflicts_with = "keys")]
        all: bool,
    },
    /// Prints the path of a model's main file (it must be in the cache).
    Path {
        /// The model's key.
        key: String,
    },
    /// Deletes the models' files from the caches.
    Remove {
        /// The models' keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

/// Parses `20GiB`, `500MB`, `1.5G`, plain bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 20GiB, 500MB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        u => return Err(format!("unknown unit `{u}` in `{s}`")),
    };
    Ok((n * mult) as u64)
}

/// The exit code an error maps to.
fn code(e: &Error) -> u8 {
    match e {
        Error::Catalogue { .. }
        | Error::NotInCatalogue { .. }
        | Error::InvalidEntry { .. }
        | Error::UnsafePath { .. } => 2,
        Error::NotDownloaded { .. } | Error::HashMismatch { removed: false, .. } => 3,
        _ => 1,
    }
}

/// A failure to report: its message and exit code.
struct Failure(String, u8);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure(e.to_string(), code(&e))
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (b as f64, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIRE_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    match run(&cli) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(c) => ExitCode::from(c),
        Err(Failure(msg, c)) => {
            eprintln!("sire: error: {msg}");
            ExitCode::from(c)
        }
    }
}

fn registry(cli: &Cli, required: bool) -> Result<Registry, Failure> {
    let mut catalogues = cli.catalogues.clone();
    if catalogues.is_empty() {
        if let Some(v) = std::env::var_os("SIRE_CATALOGUE") {
            catalogues = std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect();
        }
    }
    if catalogues.is_empty() && required {
        return Err(Failure("no catalogue: pass --catalogue FILE or set SIRE_CATALOGUE".into(), 2));
    }
    let mut b = Registry::builder()
        .allow_unhashed(cli.allow_unhashed)
        .allow_pickle(cli.allow_pickle)
        .progress(!cli.quiet);
    if let Some(m) = cli.max_size {
        b = b.max_download_size(m);
    }
    for c in catalogues {
        b = b.catalogue(c);
    }
    let reg = b.build()?;
    for o in reg.overrides() {
        eprintln!(
            "sire: warning: model `{}` from {} replaces the one from {}",
            o.key,
            o.now.display(),
            o.previous.display()
        );
    }
    Ok(reg)
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON output"));
}

fn run(cli: &Cli) -> Result<u8, Failure> {
    match &cli.command {
        Command::Devices => devices(cli),
        Command::Cache => cache(cli),
        Command::Models { command } => models(cli, command),
    }
}

fn devices(cli: &Cli) -> Result<u8, Failure> {
    let pools = sire::ResourcePoolManagement::builder().build()?;
    let cuda_count = tch::Cuda::device_count().max(0) as usize;
    let mut cuda = Vec::new();
    for i in 0..cuda_count {
        let mem = sire::device_memory(i).ok();
        cuda.push(json!({
            "index": i,
            "free": mem.as_ref().map(|m| m.free),
            "total": mem.as_ref().map(|m| m.total),
        }));
    }
    let driver = match nvml_wrapper::Nvml::init() {
        Ok(nvml) => {
            let names: Vec<String> = (0..nvml.device_count().unwrap_or(0))
                .map(|i| {
                    nvml.device_by_index(i).and_then(|d| d.name()).unwrap_or_else(|e| format!("? ({e})"))
                })
                .collect();
            json!({ "driver_version": nvml.sys_driver_version().ok(), "devices": names })
        }
        Err(e) => json!({ "error": format!("NVML unavailable: {e}") }),
    };
    let list: Vec<Value> = pools
        .pools()
        .iter()
        .map(|(loc, budget)| json!({ "location": loc.to_string(), "budget": budget }))
        .collect();
    let spill = pools.spill_dir().map(|p| p.display().to_string());
    if cli.json {
        print_json(&json!({ "pools": list, "cuda": cuda, "driver": driver, "spill_dir": spill }));
        return Ok(0);
    }
    println!("pools:");
    for (loc, budget) in pools.pools() {
        println!("  {:<8} budget {}", loc.to_string(), human_bytes(budget));
    }
    if !pools.pools().iter().any(|(l, _)| matches!(l, Location::Cuda(_))) {
        println!("  cuda     none");
    }
    for c in &cuda {
        let get = |k: &str| c[k].as_u64().map_or("?".into(), human_bytes);
        println!("cuda:{}: {} free of {}", c["index"], get("free"), get("total"));
    }
    match driver.get("error") {
        Some(e) => println!("driver: {}", e.as_str().unwrap_or("?")),
        None => println!(
            "driver: NVIDIA {} ({})",
            driver["driver_version"].as_str().unwrap_or("?"),
            driver["devices"]
        ),
    }
    if let Some(s) = spill {
        println!("spill dir: {s}");
    }
    Ok(0)
}

fn cache(cli: &Cli) -> Result<u8, Failure> {
    let reg = registry(cli, false)?;
    let usage = reg.cache_usage();
    if cli.json {
        print_json(&usage);
        return Ok(0);
    }
    let total: u64 = usage.sire.values().sum();
    println!("sire cache: {} ({})", usage.dirs.sire.display(), human_bytes(total));
    for (t, size) in &usage.sire {
        println!("  {t:<16} {}", human_bytes(*size));
    }
    let hf: u64 = usage.hf.iter().map(|r| r.size).sum();
    println!("hugging face cache: {} ({})", usage.dirs.hf.display(), human_bytes(hf));
    for r in &usage.hf {
        let used = if r.used_by.is_empty() {
            String::new()
        } else {
            format!("  shared, used by: {}", r.used_by.join(", "))
        };
        println!("  {:<40} {}{used}", r.repo, human_bytes(r.size));
    }
    Ok(0)
}

fn keys(reg: &Registry, keys: &[String], all: bool) -> Vec<String> {
    if all {
        reg.entries().map(|e| e.key.clone()).collect()
    } else {
        keys.to_vec()
    }
}

/// Runs `f` on each key in turn, going on after a failure (printed, and
/// listed as `{"key", "error"}`). `f` returns the key's JSON value and its
/// exit status (0 if it went well). With `--json` the values are printed as
/// one list at the end. Returns the first key's status that is not 0.
fn per_key(cli: &Cli, keys: Vec<String>, mut f: impl FnMut(&str) -> Result<(Value, u8), Error>) -> u8 {
    let mut out = Vec::new();
    let mut status = 0;
    for key in keys {
        let (value, code) = f(&key).unwrap_or_else(|e| {
            eprintln!("sire: error: {e}");
            (json!({ "key": key, "error": e.to_string() }), code(&e))
        });
        if status == 0 {
            status = code;
        }
        out.push(value);
    }
    if cli.json {
        print_json(&out);
    }
    status
}

fn models(cli: &Cli, command: &Models) -> Result<u8, Failure> {
    let reg = registry(cli, true)?;
    match command {
        Models::List { model_type, available, missing, filters, search } => {
            let mut f = Filter::new();
            if let Some(t) = model_type {
                f = f.model_type(t.parse::<ModelType>().unwrap_or_else(|e| match e {}));
            }
            if *available || *missing {
                f = f.available(*available);
            }
            for kv in filters {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| Failure(format!("--filter {kv:?}: expected KEY=VALUE"), 2))?;
                f = f.metadata(k, v);
            }
            if let Some(s) = search {
                f = f.text(s);
            }
            let list = reg.list(&f)?;
            if cli.json {
                print_json(&list);
                return Ok(0);
            }
            for l in &list {
                let state = if l.available { "available" } else { "missing" };
                println!(
                    "{:<24} {:<12} {:<10} {:>10}  {}",
                    l.entry.key,
                    l.entry.model_type,
                    state,
                    human_bytes(l.size),
                    l.entry.name
                );
            }
            Ok(0)
        }
        Models::Download { keys: k, all } => Ok(per_key(cli, keys(&reg, k, *all), |key| {
            let paths = reg.download(key)?;
            if !cli.json {
                for p in &paths {
                    println!("{key}\t{}", p.display());
                }
            }
            Ok((json!({ "key": key, "paths": paths }), 0))
        })),
        Models::Validate { keys: k, all } => Ok(per_key(cli, keys(&reg, k, *all), |key| {
            let v = reg.validate(key)?;
            if !cli.json {
                let bad: Vec<String> = v
                    .files
                    .iter()
                    .filter(|f| !matches!(f.state, sire::registry::FileState::Valid))
                    .map(|f| format!("{}: {:?}", f.path, f.state).to_lowercase())
                    .collect();
                if v.available {
                    println!("{key}\tvalid");
                } else {
                    println!("{key}\tnot available ({})", bad.join(", "));
                }
            }
            let status = if v.available { 0 } else { 3 };
            Ok((serde_json::to_value(&v).expect("JSON"), status))
        })),
        Models::Path { key } => {
            let p = reg.path(key)?;
            if cli.json {
                print_json(&json!({ "key": key, "path": p }));
            } else {
                println!("{}", p.display());
            }
            Ok(0)
        }
        Models::Remove { keys } => {
            // Every key is tried; each has its result; any failure exits 1.
            let mut out = Vec::new();
            let mut status = 0;
            for key in keys {
                match reg.remove(key) {
                    Ok(freed) => {
                        if !cli.json {
                            println!("{key}\tfreed {}", human_bytes(freed));
                        }
                        out.push(json!({ "key": key, "freed": freed }));
                    }
                    Err(e) => {
                        eprintln!("sire: error: {e}");
                        out.push(json!({ "key": key, "error": e.to_string() }));
                        status = 1;
                    }
                }
            }
            if cli.json {
                print_json(&out);
            }
            Ok(status)
        }
    }
}
