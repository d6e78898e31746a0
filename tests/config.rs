//! Configuration errors through the public API. One test in its own binary: it
//! sets environment variables, which must not race with other tests.

#[test]
fn malformed_budget_variables_are_typed_errors_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let build = || sire::ResourcePoolManagement::builder().cuda(false).spill_dir(dir.path()).build();
    for (var, bad) in
        [("SIRE_CPU_BUDGET", "12 parsecs"), ("SIRE_CPU_BUDGET", "-3GiB"), ("SIRE_DISK_BUDGET", "1.5.2")]
    {
        std::env::set_var(var, bad);
        match build() {
            Err(sire::Error::InvalidBudget { name, value, .. }) => {
                assert_eq!((name.as_str(), value.as_str()), (var, bad));
            }
            other => panic!("{var}={bad:?}: expected InvalidBudget, got {other:?}"),
        }
        std::env::remove_var(var);
    }
    // Well-formed values are applied: bytes, units and fractions.
    std::env::set_var("SIRE_CPU_BUDGET", "96MiB");
    std::env::set_var("SIRE_DISK_BUDGET", "2GB");
    let pools = build().unwrap();
    assert!(pools.pools().contains(&(sire::Location::Cpu, 96 << 20)), "{pools}");
    assert!(pools.pools().contains(&(sire::Location::Disk, 2_000_000_000)), "{pools}");
    // Builder values win over the environment.
    let pools = sire::ResourcePoolManagement::builder()
        .cuda(false)
        .cpu_budget(1234)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    assert!(pools.pools().contains(&(sire::Location::Cpu, 1234)), "{pools}");
}
