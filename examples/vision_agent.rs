//! A vision agent that alternates two models on one shared device (the
//! `SharedModelManager` pattern): a detector finds objects in a frame, then a
//! captioner describes them. Frames are handled by concurrent tokio tasks; the
//! manager keeps at most one model on the device at a time, for as long as a
//! guard on it lives, and offloads the other.
//!
//! With a GPU the device is `cuda:0` and the idle model waits in host memory;
//! without one the device is the CPU and the idle model waits on disk. Both
//! models are small `tch::nn` networks with fixed seeds; every output is
//! checked against the same model run directly, before it was managed.
//!
//! Run: `cargo run --example vision_agent --features tokio`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sire::{Event, ExclusiveGuard, ResourcePoolManagement, SharedModelManager};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const VOCAB: [&str; 12] =
    ["a", "the", "red", "small", "cat", "dog", "car", "near", "on", "window", "road", "sofa"];
const WORDS: i64 = 5;
const BOXES: i64 = 4;

/// Finds `BOXES` boxes in a 3×32×32 frame: (x, y, w, h, score) each in 0..1.
///
/// tch's layers hold `Tensor`s, which are `Send` but not `Sync`; a model shared
/// between tasks must be `Sync`, so the layers sit behind a `Mutex`.
#[derive(Debug)]
struct Detector {
    vs: nn::VarStore,
    net: Mutex<nn::Sequential>,
}

/// Turns detections into `WORDS` word ids.
#[derive(Debug)]
struct Captioner {
    vs: nn::VarStore,
    net: Mutex<nn::Sequential>,
}

impl sire::ResourceUser for Detector {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vs.tensors()
    }
}

impl sire::ResourceUser for Captioner {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vs.tensors()
    }
}

impl Detector {
    fn new() -> Self {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root();
        let conv = nn::ConvConfig { padding: 1, ..Default::default() };
        let net = nn::seq()
            .add(nn::conv2d(&p / "c1", 3, 16, 3, conv))
            .add_fn(|x| x.relu().max_pool2d_default(2))
            .add(nn::conv2d(&p / "c2", 16, 32, 3, conv))
            .add_fn(|x| x.relu().adaptive_avg_pool2d([1, 1]).flatten(1, -1))
            .add(nn::linear(&p / "head", 32, BOXES * 5, Default::default()))
            .add_fn(|x| x.sigmoid().view([-1, BOXES, 5]));
        Detector { vs, net: Mutex::new(net) }
    }

    fn detect(&self, frame: &Tensor) -> Tensor {
        self.net.lock().unwrap().forward(frame)
    }
}

impl Captioner {
    fn new() -> Self {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root();
        let net = nn::seq()
            .add(nn::linear(&p / "l1", BOXES * 5, 64, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&p / "l2", 64, WORDS * VOCAB.len() as i64, Default::default()))
            .add_fn(|x| x.view([-1, WORDS, VOCAB.len() as i64]).argmax(-1, false));
        Captioner { vs, net: Mutex::new(net) }
    }

    fn caption(&self, detections: &Tensor) -> Tensor {
        let d = detections.flatten(1, -1);
        let z = (&d - d.mean(Kind::Float)) / d.std(true); // what stands out
        self.net.lock().unwrap().forward(&z)
    }
}

fn words(ids: &Tensor) -> String {
    let ids = Vec::<i64>::try_from(ids.to_device(Device::Cpu).flatten(0, -1)).expect("word ids");
    ids.iter().map(|&i| VOCAB[i as usize]).collect::<Vec<_>>().join(" ")
}

/// Where each model is now, for the log.
fn placement(shared: &SharedModelManager) -> String {
    ["detector", "captioner"]
        .iter()
        .map(|id| format!("{id}@{}", shared.model_location(id).expect("added")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a model on tokio's blocking pool (compute does not belong on the
/// executor); the guard moves along, so the model stays put until it is done.
async fn run<T, R>(g: ExclusiveGuard<T>, f: impl FnOnce(&T, Device) -> R + Send + 'static) -> R
where
    T: Send + Sync + 'static,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(move || f(&g, g.device())).await.expect("model panicked")
}

#[tokio::main]
async fn main() -> sire::Result<()> {
    // An observer of every move: how many of the two models are on the device.
    let on_device = Arc::new(Mutex::new(std::collections::HashMap::<String, bool>::new()));
    let most = Arc::new(AtomicUsize::new(0));
    let (seen, m) = (on_device.clone(), most.clone());
    let pools = ResourcePoolManagement::builder()
        .listener(move |e: &Event| {
            let mut seen = seen.lock().unwrap();
            seen.insert(e.model.clone(), e.resident());
            m.fetch_max(seen.values().filter(|r| **r).count(), Ordering::SeqCst);
        })
        .build()?;
    let shared = SharedModelManager::with_pools(pools.clone());
    println!("{pools}");
    println!("shared device: {}\n", shared.location());

    // Two cameras, three frames each, and what the models say about each frame
    // when run directly (the reference every managed output is checked against).
    tch::manual_seed(42);
    let (detector, captioner) = (Detector::new(), Captioner::new());
    let mut cameras: Vec<Vec<(Tensor, Tensor, String)>> = Vec::new();
    for _camera in 0..2 {
        let frames = (0..3)
            .map(|_| {
                // A tinted, noisy frame: the tint changes what the models see.
                let tint = Tensor::rand([1, 3, 1, 1], (Kind::Float, Device::Cpu)) * 4.0;
                let frame = Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu)) * tint;
                let dets = detector.detect(&frame);
                let caption = words(&captioner.caption(&dets));
                (frame, dets, caption)
            })
            .collect();
        cameras.push(frames);
    }

    shared.add_with_id("detector", detector)?;
    shared.add_with_id("captioner", captioner)?;
    println!("added                 {}", placement(&shared));

    // One task per camera: detect, then caption, frame after frame. While one
    // camera captions, the other waits for the detector, and vice versa.
    let agents: Vec<tokio::task::JoinHandle<sire::Result<()>>> = cameras
        .into_iter()
        .enumerate()
        .map(|(cam, frames)| {
            let shared = shared.clone();
            tokio::spawn(async move {
                for (i, (frame, expected_dets, expected_caption)) in frames.into_iter().enumerate() {
                    let g = shared.fetch_model_async::<Detector>("detector").await?;
                    println!("cam {cam} frame {i}: detect  {}", placement(&shared));
                    let dets =
                        run(g, move |d, dev| d.detect(&frame.to_device(dev)).to_device(Device::Cpu)).await;
                    assert!(dets.equal(&expected_dets), "camera {cam} frame {i}: wrong detections");

                    let g = shared.fetch_model_async::<Captioner>("captioner").await?;
                    println!("cam {cam} frame {i}: caption {}", placement(&shared));
                    let d = dets.shallow_clone();
                    let caption = words(&run(g, move |c, dev| c.caption(&d.to_device(dev))).await);
                    assert_eq!(caption, expected_caption, "camera {cam} frame {i}: wrong caption");
                    let best = dets.select(2, 4).max().double_value(&[]);
                    println!("cam {cam} frame {i}: {BOXES} boxes, best score {best:.2}: \"{caption}\"");
                }
                Ok(())
            })
        })
        .collect();
    for a in agents {
        a.await.expect("agent panicked")?;
    }

    println!("\n{}", pools.stats());
    let most = most.load(Ordering::SeqCst);
    assert_eq!(most, 1, "both models were on the device at once");
    println!(
        "\nall detections and captions correct; at most {most} model on {} at any time",
        shared.location()
    );
    Ok(())
}
