//! The model registry, offline: writes a safetensors state dict and a
//! catalogue that names it with a `file://` URL and its sha256, then lists,
//! downloads (a verified copy into a private cache), validates and loads the
//! model by key into a managed `TensorSet`, checking its values against what
//! was written. Everything lives in a temporary folder.
//!
//! Run: `cargo run --example registry --features registry`

use serde_json::json;
use sire::registry::{Filter, Registry};
use tch::{Kind, Tensor};

fn main() -> sire::Result<()> {
    let dir = tempfile::tempdir()?;

    // A state dict, as a training script would leave it.
    tch::manual_seed(0);
    let weight = Tensor::randn([256, 128], (Kind::Float, tch::Device::Cpu));
    let bias = Tensor::zeros([256], (Kind::Float, tch::Device::Cpu));
    let source = dir.path().join("published/encoder.safetensors");
    std::fs::create_dir_all(source.parent().unwrap())?;
    Tensor::write_safetensors(&[("proj.weight", &weight), ("proj.bias", &bias)], &source)?;

    // The catalogue: one model, its file with its sha256, where to get it.
    let catalogue = dir.path().join("catalogue.json");
    let entry = json!({
        "encoder": {
            "name": "Tiny encoder",
            "type": "safetensors",
            "description": "A projection layer, for the example",
            "license": "apache-2.0",
            "config": {
                "files": [{ "path": "encoder/model.safetensors", "sha256": sire::registry::sha256_file(&source)? }],
                "download": [{
                    "file_name": "model.safetensors",
                    "file_path": "encoder",
                    "file_url": format!("file://{}", source.display())
                }]
            }
        }
    });
    std::fs::write(&catalogue, serde_json::to_string_pretty(&entry).expect("JSON"))?;

    // A CPU + disk instance of its own, and a private cache.
    let pools =
        sire::ResourcePoolManagement::builder().cuda(false).spill_dir(dir.path().join("spill")).build()?;
    let registry = Registry::builder()
        .catalogue(&catalogue)
        .cache_dir(dir.path().join("cache"))
        .hf_cache_dir(dir.path().join("hf"))
        .pools(pools)
        .build()?;

    for l in registry.list(&Filter::new().metadata("license", "apache-2.0"))? {
        println!("{:<10} {:<12} available: {}", l.entry.key, l.entry.model_type, l.available);
        assert!(!l.available, "nothing is in the cache yet");
    }

    let paths = registry.download("encoder")?;
    println!("downloaded to {}", paths[0].display());
    let v = registry.validate("encoder")?;
    assert!(v.available);
    println!("validated: sha256 {}", v.files[0].sha256.as_deref().unwrap_or("?"));

    let model = registry.load("encoder")?;
    let set = model.tensors().expect("a state dict loads as tensors");
    {
        let g = sire::auto_manage(set)?;
        let w = g.get("proj.weight").expect("proj.weight");
        assert!(w.equal(&weight), "the loaded weights are the written ones");
        println!("proj.weight on {:?}: {:?}", g.device(), w.size());
    }
    for info in registry.loaded_models() {
        println!(
            "loaded {} ({}) from {}, now on {:?}",
            info.key,
            info.model_type,
            info.path.display(),
            info.location
        );
    }
    let usage = registry.cache_usage();
    println!("sire cache {}: {:?}", usage.dirs.sire.display(), usage.sire);
    Ok(())
}
