//! Telling TorchScript archives from pickles: what a weight file is, from its
//! bytes (never from its name).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// What a file holds, as far as loading it safely goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// A zip archive with TorchScript code (`code/`, `constants.pkl`): its
    /// pickles hold only constants that the TorchScript loader restricts.
    TorchScript,
    /// A zip archive of pickles without code: a `torch.save` checkpoint.
    ZipPickle,
    /// A raw pickle (protocol 2 to 5): legacy `torch.save`, `pickle.dump`.
    Pickle,
    /// Anything else (safetensors, JSON, ...).
    Other,
}

impl Format {
    /// What to call it in an error, when it is a pickle.
    pub(crate) fn pickle_name(self) -> Option<&'static str> {
        match self {
            Format::ZipPickle => Some("a zip archive of pickles (torch.save) without TorchScript code"),
            Format::Pickle => Some("a raw Python pickle"),
            _ => None,
        }
    }
}

/// Reads the file's first bytes (and a zip archive's list of entries).
pub(crate) fn sniff(path: &Path) -> io::Result<Format> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 4];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let head = &head[..n];
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Ok(Format::Pickle);
    }
    if head == b"PK\x03\x04" || head == b"PK\x05\x06" {
        let archive = zip::ZipArchive::new(File::open(path)?).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("a malformed zip archive: {e}"))
        })?;
        let names: Vec<&str> = archive.file_names().collect();
        let code = names
            .iter()
            .any(|n| n.starts_with("code/") || n.contains("/code/") || n.ends_with("constants.pkl"));
        if code {
            return Ok(Format::TorchScript);
        }
        if names.iter().any(|n| n.ends_with(".pkl")) {
            return Ok(Format::ZipPickle);
        }
    }
    Ok(Format::Other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tells_torchscript_from_pickles() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        assert_eq!(sniff(&data.join("ts_buffers.pt")).unwrap(), Format::TorchScript);
        assert_eq!(sniff(&data.join("ts_buffers_io.safetensors")).unwrap(), Format::Other);
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw.bin");
        std::fs::write(&raw, [0x80, 0x04, 0x95, 0x00]).unwrap();
        assert_eq!(sniff(&raw).unwrap(), Format::Pickle);
        let zipped = dir.path().join("sd.pt");
        let mut w = zip::ZipWriter::new(File::create(&zipped).unwrap());
        w.start_file("archive/data.pkl", zip::write::FileOptions::default()).unwrap();
        w.write_all(&[0x80, 0x02, b'.']).unwrap();
        w.start_file("archive/data/0", zip::write::FileOptions::default()).unwrap();
        w.write_all(&[0; 16]).unwrap();
        w.finish().unwrap();
        assert_eq!(sniff(&zipped).unwrap(), Format::ZipPickle);
    }
}
