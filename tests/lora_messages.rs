//! A LoRA module that matches no weight, or several, says which (defect 18).

use sire::{Error, Lora};
use tch::{Device, Kind, Tensor};

fn lora(module: &str) -> Lora {
    let a = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
    Lora::from_tensors([(format!("{module}.lora_A.weight"), a), (format!("{module}.lora_B.weight"), b)])
        .unwrap()
}

const MODEL: [&str; 4] = ["enc.attn.q.weight", "dec.attn.q.weight", "enc.attn.q.bias", "head.weight"];

#[test]
fn a_key_matching_several_weights_lists_them() {
    match lora("attn.q").to_commit(MODEL, 1.0) {
        Err(e @ Error::AmbiguousKey { .. }) => {
            let msg = e.to_string();
            assert_eq!(
                msg,
                "LoRA key `attn.q` matches several tensors of the model \
                 (`enc.attn.q.weight`, `dec.attn.q.weight`); it must match exactly one"
            );
            let Error::AmbiguousKey { key, candidates } = e else { unreachable!() };
            assert_eq!((key.as_str(), candidates.len()), ("attn.q", 2));
        }
        other => panic!("expected AmbiguousKey, got {other:?}"),
    }
    // Naming the module in full resolves it.
    let c = lora("enc.attn.q").to_commit(MODEL, 1.0).unwrap();
    assert_eq!(c.targets().collect::<Vec<_>>(), ["enc.attn.q.weight"]);
}

#[test]
fn a_key_matching_nothing_says_so_and_what_was_tried() {
    match lora("base_model.model.mlp.up").to_commit(MODEL, 1.0) {
        Err(e @ Error::UnmatchedKey { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("LoRA key `base_model.model.mlp.up` matches no tensor of the model: tried `mlp.up.weight`"),
                "{msg}"
            );
            assert!(msg.contains("`head.weight`") && !msg.contains("several"), "{msg}");
        }
        other => panic!("expected UnmatchedKey, got {other:?}"),
    }
}
