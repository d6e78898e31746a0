//! Core runtime behaviour on the real CPU + disk tiers (no GPU needed): without a
//! GPU the runtime location is the CPU and the offload location is the disk, so
//! every eviction below really writes a safetensors file and reads it back.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use sire::{
    auto_manage, auto_manage_timeout, try_auto_manage, Error, Location, ManageOptions, OffloadPolicy,
};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

fn named(name: &str) -> ManageOptions {
    ManageOptions::new().name(name)
}

#[test]
fn lru_order_narrated() {
    // Room for exactly three 1 MiB models in host memory.
    let (pools, _dir) = pools(3 * MIB);
    let a = pools.manage_with(model(1, MIB), named("a")).unwrap();
    let b = pools.manage_with(model(2, MIB), named("b")).unwrap();
    let c = pools.manage_with(model(3, MIB), named("c")).unwrap();
    // a, b, c fit: all in host memory, nothing on disk. LRU order (old -> new): a b c.
    let s = pools.stats();
    assert_eq!(residents(&s, Location::Cpu), ["c", "b", "a"]);
    assert!(residents(&s, Location::Disk).is_empty());

    // Registering d needs room: a is the least recently used, so a (and only a) is spilled.
    let d = pools.manage_with(model(4, MIB), named("d")).unwrap();
    let s = pools.stats();
    assert_eq!(residents(&s, Location::Cpu), ["d", "c", "b"]);
    assert_eq!(residents(&s, Location::Disk), ["a"]);
    assert_eq!(a.location(), Location::Disk);

    // Using b is a hit (it is resident): it becomes the most recent. Order: c d b.
    drop(auto_manage(&b).unwrap());
    assert_eq!(pools.stats().misses, 0);

    // Using a again loads it and evicts the least recently used idle model: c.
    drop(auto_manage(&a).unwrap());
    let s = pools.stats();
    assert_eq!(residents(&s, Location::Cpu), ["a", "b", "d"]);
    assert_eq!(c.location(), Location::Disk);
    assert_eq!(s.misses, 1);
    assert_eq!(s.evictions, 2); // a at registration of d, then c

    // Using d then c: c's load evicts the LRU, which is now b (order was d b a -> b a d).
    drop(auto_manage(&d).unwrap());
    drop(auto_manage(&c).unwrap());
    let s = pools.stats();
    assert_eq!(residents(&s, Location::Cpu), ["c", "d", "a"]);
    assert_eq!(b.location(), Location::Disk);
    check_invariants(&s);
}

#[test]
fn a_model_in_use_is_never_evicted_and_waiters_get_room_when_it_drops() {
    // Room for one model only.
    let (pools, _dir) = pools(MIB);
    let a = pools.manage_with(model(1, MIB), named("a")).unwrap();
    let b = pools.manage_with(model(2, MIB), named("b")).unwrap();
    assert_eq!(a.location(), Location::Disk);

    let ga = auto_manage(&a).unwrap(); // b is idle: evicted to make room for a
    assert_eq!(b.location(), Location::Disk);

    // b cannot load while a is in use: the non-waiting form fails at once...
    match try_auto_manage(&b) {
        Err(Error::OutOfMemory { location: Location::Cpu, waited: None, requested, .. }) => {
            assert_eq!(requested, MIB)
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    // ...the timed form waits, then fails, and a was not touched.
    match auto_manage_timeout(&b, Duration::from_millis(100)) {
        Err(Error::OutOfMemory { waited: Some(w), .. }) => assert_eq!(w, Duration::from_millis(100)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(a.location(), Location::Cpu);
    assert_eq!(a.use_count(), 1);

    // A waiter gets the room as soon as the guard drops.
    let b2 = b.clone();
    let waiter = std::thread::spawn(move || {
        let g = auto_manage_timeout(&b2, Duration::from_secs(30)).expect("room after the guard drops");
        g.get("a").unwrap().size()
    });
    // Let the waiter block (its success does not depend on this sleep, only the scenario does).
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(a.location(), Location::Cpu, "a is in use and must stay");
    drop(ga);
    assert_eq!(waiter.join().unwrap(), vec![(MIB / 8) as i64]);
    assert_eq!(a.location(), Location::Disk);
    check_invariants(&pools.stats());
}

#[test]
fn too_large_fails_at_once_naming_the_sizes() {
    let (pools, _dir) = pools(MIB);
    let big = pools.manage_with(model(1, 2 * MIB), named("big")).unwrap();
    // It could only be admitted straight to disk.
    assert_eq!(big.location(), Location::Disk);
    let t = std::time::Instant::now();
    let err = auto_manage(&big).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "TooLarge must not wait");
    match &err {
        Error::TooLarge { requested, budget, location: Location::Cpu, model } => {
            assert_eq!((*requested, *budget), (2 * MIB, MIB));
            assert_eq!(model, "big");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("2.00 MiB") && msg.contains("1.00 MiB"), "{msg}");
}

#[test]
fn a_varstore_module_computes_the_same_after_evict_and_reload() {
    let (pools, _dir) = pools(64 * MIB);
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = nn::seq()
        .add(nn::linear(vs.root() / "l1", 32, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(vs.root() / "l2", 64, 8, Default::default()));
    let x = Tensor::randn([5, 32], (Kind::Float, Device::Cpu));
    let before = net.forward(&x);
    let m = pools.manage_with(vs, named("mlp")).unwrap();
    assert_eq!(m.size_bytes(), ((32 * 64 + 64 + 64 * 8 + 8) * 4) as u64);

    m.offload().unwrap();
    assert_eq!(m.location(), Location::Disk);
    {
        let g = auto_manage(&m).unwrap();
        // `net` was built before `manage` and holds its own handles on the weights.
        let after = net.forward(&x.to_device(g.device()));
        assert!(before.equal(&after), "outputs differ after a round trip through disk");
    }
    check_invariants(&pools.stats());
}

#[test]
fn weights_are_bit_identical_after_many_cycles_through_disk() {
    let (pools, _dir) = pools(64 * MIB);
    tch::manual_seed(11);
    let kinds = [
        Kind::Float,
        Kind::Double,
        Kind::Half,
        Kind::BFloat16,
        Kind::Int64,
        Kind::Int8,
        Kind::Uint8,
        Kind::Bool,
    ];
    let set = sire::TensorSet::new(kinds.iter().enumerate().map(|(i, &k)| {
        let t = (Tensor::randn([257, 3], (Kind::Float, Device::Cpu)) * 100).to_kind(k);
        // One non-contiguous tensor too.
        let t = if i == 0 { t.tr() } else { t };
        (format!("t{i}"), t)
    }))
    .unwrap();
    let reference = snapshot(&set);
    let m = pools.manage_with(set, named("mixed")).unwrap();
    for _ in 0..30 {
        m.offload().unwrap();
        assert_eq!(m.location(), Location::Disk);
        let g = auto_manage(&m).unwrap();
        assert_eq!(snapshot(&g), reference);
    }
    let s = pools.stats();
    // Written once (the model stayed clean), read back 30 times.
    assert_eq!(s.bytes_to_disk, m.size_bytes());
    assert_eq!(s.bytes_from_disk, 30 * m.size_bytes());
}

#[test]
fn a_model_written_in_place_is_written_again() {
    let (pools, _dir) = pools(64 * MIB);
    let m = pools.manage_with(model(1, MIB), named("m")).unwrap();
    m.offload().unwrap();
    {
        let g = auto_manage(&m).unwrap();
        let _ = g.get("a").unwrap().fill_(3.0);
    }
    m.offload().unwrap();
    let g = auto_manage(&m).unwrap();
    let a = g.get("a").unwrap();
    assert_eq!(a.min().double_value(&[]), 3.0);
    assert_eq!(a.max().double_value(&[]), 3.0);
    assert_eq!(pools.stats().bytes_to_disk, 2 * MIB, "dirty model must be rewritten, clean one not");
}

#[test]
fn eager_policy_offloads_when_the_last_guard_drops_lazy_stays() {
    let (pools, _dir) = pools(64 * MIB);
    let lazy = pools.manage_with(model(1, MIB), named("lazy")).unwrap();
    let eager = pools.manage_with(model(2, MIB), named("eager").policy(OffloadPolicy::Eager)).unwrap();
    {
        let g1 = auto_manage(&eager).unwrap();
        let g2 = auto_manage(&eager).unwrap();
        drop(g1);
        // A use count, not a flag: one guard is still alive.
        assert_eq!(eager.location(), Location::Cpu);
        drop(g2);
    }
    assert_eq!(eager.location(), Location::Disk);
    drop(auto_manage(&lazy).unwrap());
    assert_eq!(lazy.location(), Location::Cpu);
    check_invariants(&pools.stats());
}

#[test]
fn concurrent_first_uses_are_coalesced_into_one_load() {
    let (pools, _dir) = pools(64 * MIB);
    let m = pools.manage_with(model(1, 8 * MIB), named("m")).unwrap();
    m.offload().unwrap();
    let before = pools.stats();
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (m, barrier) = (m.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let g = auto_manage(&m).unwrap();
                g.get("a").unwrap().sum(Kind::Double).double_value(&[])
            })
        })
        .collect();
    let sums: Vec<f64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(sums.windows(2).all(|w| w[0] == w[1]));
    let after = pools.stats();
    assert_eq!(after.misses - before.misses, 1, "one load for {n} threads");
    assert_eq!(after.bytes_from_disk - before.bytes_from_disk, 8 * MIB);
    assert_eq!(after.hits - before.hits, n as u64 - 1);
}

#[test]
fn a_panic_inside_a_guarded_region_releases_the_guard() {
    let (pools, _dir) = pools(MIB);
    let a = pools.manage_with(model(1, MIB), named("a")).unwrap();
    let b = pools.manage_with(model(2, MIB), named("b")).unwrap();
    let a2 = a.clone();
    let r = std::thread::spawn(move || {
        let _g = auto_manage(&a2).unwrap();
        panic!("inference failed");
    })
    .join();
    assert!(r.is_err());
    assert_eq!(a.use_count(), 0);
    // The room a holds is reclaimable at once.
    drop(try_auto_manage(&b).expect("a was released by the panic"));
}

#[test]
fn stress_invariants_hold_after_every_step() {
    // Eight 1 MiB models, room for three; four threads use them at random.
    let (pools, _dir) = pools(3 * MIB);
    let models: Vec<_> =
        (0..8).map(|i| pools.manage_with(model(i, MIB), named(&format!("m{i}"))).unwrap()).collect();
    let sums: Vec<f64> = models
        .iter()
        .map(|m| {
            let g = auto_manage(m).unwrap();
            g.get("b").unwrap().sum(Kind::Double).double_value(&[])
        })
        .collect();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (models, sums, pools) = (models.clone(), sums.clone(), pools.clone());
            std::thread::spawn(move || {
                let mut x = t * 7919 + 1;
                for step in 0..150 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let i = (x >> 33) as usize % models.len();
                    {
                        let g = auto_manage(&models[i]).unwrap();
                        let s = g.get("b").unwrap().sum(Kind::Double).double_value(&[]);
                        assert_eq!(s, sums[i], "model {i} has wrong weights at step {step}");
                        check_invariants(&pools.stats());
                    }
                    if step % 10 == 0 {
                        let _ = models[(i + 1) % models.len()].offload(); // InUse is fine
                    }
                    check_invariants(&pools.stats());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = pools.stats();
    check_invariants(&s);
    assert!(s.evictions > 0 && s.misses > 0, "the stress must evict:\n{s}");
    assert!(models.iter().all(|m| m.use_count() == 0));
}

#[test]
fn unknown_device_and_contradictory_options_are_rejected() {
    let (pools, _dir) = pools(64 * MIB);
    match pools.manage_with(model(1, 1024), named("x").runtime(Location::Cuda(3))) {
        Err(Error::UnknownDevice { location: Location::Cuda(3), available: 0 }) => {}
        other => panic!("expected UnknownDevice, got {other:?}"),
    }
    assert!(matches!(
        pools.manage_with(model(1, 1024), named("x").offload(Location::Cpu)),
        Err(Error::InvalidOptions { .. })
    ));
    assert!(matches!(
        pools.manage_with(model(1, 1024), named("x").runtime(Location::Disk)),
        Err(Error::InvalidOptions { .. })
    ));
}

#[test]
fn a_corrupted_spill_file_is_detected_and_the_model_stays_on_disk() {
    let (pools, _dir) = pools(64 * MIB);
    let m = pools.manage_with(model(1, MIB), named("m")).unwrap();
    m.offload().unwrap();
    let files: Vec<_> = std::fs::read_dir(pools.spill_dir().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    assert_eq!(files.len(), 1);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x40;
    std::fs::write(&files[0], &bytes).unwrap();
    match auto_manage(&m) {
        Err(Error::Corrupt { path, detail }) => {
            assert_eq!(path, files[0]);
            assert!(detail.contains('b'), "names the tensor: {detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(m.location(), Location::Disk);
    check_invariants(&pools.stats());
}

#[test]
fn an_unusable_spill_dir_is_a_clear_error() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let err = sire::ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .spill_dir(file.path().join("sub"))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::SpillDir { .. }), "{err}");
    assert!(err.to_string().contains("sub"), "{err}");
}

#[test]
fn dropping_the_last_handle_unregisters_and_deletes_the_spill_file() {
    let (pools, _dir) = pools(64 * MIB);
    let m = pools.manage_with(model(1, MIB), named("m")).unwrap();
    m.offload().unwrap();
    let dir = pools.spill_dir().unwrap().to_path_buf();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    drop(m);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let s = pools.stats();
    assert!(s.pools.iter().all(|p| p.used == 0 && p.residents.is_empty()), "{s}");
}

#[test]
fn a_model_from_safetensors_reloads_from_its_source_without_a_spill_copy() {
    let (pools, dir) = pools(64 * MIB);
    let src = dir.path().join("src.safetensors");
    let t = Tensor::randn([1000], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("w", &t)], &src).unwrap();
    let m = pools.manage_with(sire::TensorSet::from_safetensors(&src).unwrap(), named("st")).unwrap();
    m.offload().unwrap();
    assert_eq!(m.location(), Location::Disk);
    let g = auto_manage(&m).unwrap();
    assert!(g.get("w").unwrap().equal(&t));
    let s = pools.stats();
    assert_eq!(s.bytes_to_disk, 0, "a clean model is not rewritten");
    assert_eq!(s.pool(Location::Disk).unwrap().used, 0, "the source file is the user's, not the pool's");
}

#[test]
fn stats_print_as_a_table() {
    let (pools, _dir) = pools(2 * MIB);
    let _a = pools.manage_with(model(1, MIB), named("alpha")).unwrap();
    let s = pools.stats().to_string();
    assert!(s.contains("cpu") && s.contains("disk") && s.contains("alpha"), "{s}");
    assert!(s.contains("2.00 MiB") && s.contains("50.0%"), "{s}");
}

#[test]
fn handles_guards_and_the_manager_are_send_and_sync() {
    fn check_send_sync<T: Send + Sync>() {}
    check_send_sync::<sire::ResourcePoolManagement>();
    check_send_sync::<sire::Managed<sire::TensorSet>>();
    check_send_sync::<sire::Managed<tch::nn::VarStore>>();
    check_send_sync::<sire::Managed<tch::CModule>>();
    check_send_sync::<sire::Guard<'static, sire::TensorSet>>();
    check_send_sync::<sire::OwnedGuard<sire::TensorSet>>();
    check_send_sync::<sire::Stats>();
}

/// Issue 11: a malformed safetensors file is `Error::Corrupt` naming the file
/// and the reason, not a libtorch error with C++ stack text.
#[test]
fn malformed_safetensors_sources_are_corrupt_with_the_file_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    Tensor::write_safetensors(&[("w", Tensor::ones([64], (Kind::Float, tch::Device::Cpu)))], &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cases: [(&str, Vec<u8>); 3] = [
        ("garbage.safetensors", b"not a safetensors file at all".to_vec()),
        ("truncated.safetensors", bytes[..bytes.len() - 10].to_vec()),
        ("short.safetensors", vec![1, 2, 3]),
    ];
    for (name, content) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let err = sire::TensorSet::from_safetensors(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, sire::Error::Corrupt { .. }), "{name}: {msg}");
        assert!(msg.contains(name), "{name}: the message names the file: {msg}");
        assert!(!msg.contains("Exception raised") && !msg.contains("frame #"), "{name}: C++ text: {msg}");
    }
    let missing = dir.path().join("missing.safetensors");
    let msg = sire::TensorSet::from_safetensors(&missing).unwrap_err().to_string();
    assert!(msg.contains("missing.safetensors"), "{msg}");
    let set = sire::TensorSet::from_safetensors(&good).unwrap();
    assert_eq!(set.get("w").unwrap().sum(Kind::Float).double_value(&[]), 64.0);
}
