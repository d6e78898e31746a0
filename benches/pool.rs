//! The task pool against a plain loop and against a bare channel.
//!
//! - `cpu_bound`: 16 tasks of about 2 ms of integer arithmetic each (no
//!   torch, so no intra-op threads compete), run in a plain loop on the
//!   calling thread, and by a pool of one CPU device with 1 and with 2
//!   workers. On a 2-core machine the goal is at least 1.8x from 2 workers.
//! - `overhead`: 10,000 trivial tasks (`t + 1`), through the pool (1 worker)
//!   and through a bare `std::sync::mpsc` channel to one worker thread and
//!   back (the least a queue of tasks with results in order costs). Both
//!   start their worker thread inside the measured call. The pool's own
//!   overhead per task is the difference divided by 10,000 (goal: under 10 µs).
//!
//! After criterion's groups, `RATIO` lines give the same comparisons from the
//! fastest of 15 runs of each case (`SIRE_BENCH_RUNS` to change it), the run
//! least disturbed by other processes. Only those: `cargo bench --features
//! pool --bench pool -- RATIO` (a filter that matches no criterion benchmark).
//!
//! Run: `source scripts/env.sh && cargo bench --features pool --bench pool`

use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use sire::pool::Pool;
use sire::Location;

/// About 2 ms of dependent integer arithmetic (xorshift), seeded by the task.
fn work(seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..black_box(1_000_000u32) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

fn pool(workers: usize) -> Pool<()> {
    Pool::builder()
        .devices([Location::Cpu])
        .workers_per_device(workers)
        .progress(false)
        .build(|_| Ok::<_, String>(()))
        .expect("pool")
}

/// The trivial tasks through a bare channel to one worker thread and back,
/// results placed in task order.
fn channel(tasks: &[u64]) -> Vec<u64> {
    let (to_worker, inbox) = mpsc::channel::<(usize, u64)>();
    let (to_caller, results) = mpsc::channel::<(usize, u64)>();
    let worker = std::thread::spawn(move || {
        for (i, t) in inbox {
            to_caller.send((i, black_box(t) + 1)).expect("send");
        }
    });
    for (i, &t) in tasks.iter().enumerate() {
        to_worker.send((i, t)).expect("send");
    }
    drop(to_worker);
    let mut out = vec![0u64; tasks.len()];
    for (i, r) in results {
        out[i] = r;
    }
    worker.join().expect("worker");
    out
}

/// The fastest of `runs` calls of `f`.
fn fastest<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .min()
        .expect("runs > 0")
}

/// The `RATIO` lines (bench mode only).
fn ratios() {
    let runs = std::env::var("SIRE_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let tasks: Vec<u64> = (0..16).collect();
    let (p1, p2) = (pool(1), pool(2));
    let run = |p: &Pool<()>| p.execute(tasks.clone(), |&t, _, _| Ok::<_, String>(work(t))).expect("run");
    let plain = fastest(runs, || tasks.iter().map(|&t| work(t)).collect::<Vec<_>>());
    let one = fastest(runs, || run(&p1));
    let two = fastest(runs, || run(&p2));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "RATIO cpu_bound 16 tasks: plain loop {:.2} ms, pool 1 worker {:.2} ms ({:.3}x the loop), \
         pool 2 workers {:.2} ms: speed-up {:.2}x (goal >= 1.8x)",
        ms(plain),
        ms(one),
        one.as_secs_f64() / plain.as_secs_f64(),
        ms(two),
        plain.as_secs_f64() / two.as_secs_f64()
    );
    let n = 10_000usize;
    let trivial: Vec<u64> = (0..n as u64).collect();
    let bare = fastest(runs, || channel(&trivial));
    let pooled = fastest(runs, || {
        p1.execute(trivial.clone(), |&t, _, _| Ok::<_, String>(black_box(t) + 1)).expect("run")
    });
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "RATIO overhead per task ({n} trivial tasks): pool {:.3} µs, bare channel {:.3} µs: +{:.3} µs (goal < 10 µs)",
        us(pooled),
        us(bare),
        us(pooled) - us(bare)
    );
}

fn bench(c: &mut Criterion) {
    let tasks: Vec<u64> = (0..16).collect();
    let mut group = c.benchmark_group("cpu_bound");
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    group.bench_function("plain_loop", |b| b.iter(|| tasks.iter().map(|&t| work(t)).collect::<Vec<_>>()));
    for workers in [1, 2] {
        let p = pool(workers);
        group.bench_function(format!("pool_{workers}_workers"), |b| {
            b.iter(|| p.execute(tasks.clone(), |&t, _, _| Ok::<_, String>(work(t))).expect("run"))
        });
    }
    group.finish();

    let n = 10_000u64;
    let trivial: Vec<u64> = (0..n).collect();
    let mut group = c.benchmark_group("overhead_10000_tasks");
    group.sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    group.bench_function("mpsc_channel", |b| b.iter(|| channel(&trivial)));
    let p = pool(1);
    group.bench_function("pool_1_worker", |b| {
        b.iter(|| p.execute(trivial.clone(), |&t, _, _| Ok::<_, String>(black_box(t) + 1)).expect("run"))
    });
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::args().any(|a| a == "--bench") {
        ratios();
    }
}
