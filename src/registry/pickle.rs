//! Telling TorchScript archives from pickles: what a weight file is, from its
//! bytes (never from its name).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// What a file holds, as far as loading it safely goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// A zip archive with TorchScript code (`code/`, `constants.pkl`): its
    /// pickles hold only constants that the TorchScript loader restricts.
    TorchScript,
    /// A zip archive of pickles without code: a `torch.save` checkpoint.
    ZipPickle,
    /// A raw pickle (protocol 2 to 5, or 0 and 1 in a weight file):
    /// legacy `torch.save`, `pickle.dump`.
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

/// Opcodes a protocol 0 or 1 pickle (no `PROTO` opcode) can start with.
const PICKLE_STARTS: &[u8] = b"(}])cibILFSVNXKJMUTGP";

/// File name extensions of weight files that may be legacy pickles.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl", "pickle", "p", "tar", "model"];

/// Reads the file's first bytes (and a zip archive's list of entries).
pub(crate) fn sniff(path: &Path) -> io::Result<Format> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 16];
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
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        let archive = zip::ZipArchive::new(File::open(path)?).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("a malformed zip archive: {e}"))
        })?;
        let names: Vec<&str> = archive.file_names().collect();
        // TorchScript: `constants.pkl` and the code, `code/**.py` (an empty
        // `code/` folder is not code).
        let constants = names.iter().any(|n| *n == "constants.pkl" || n.ends_with("/constants.pkl"));
        let code = names.iter().any(|n| {
            (n.starts_with("code/") || n.contains("/code/")) && n.ends_with(".py") && !n.ends_with("/.py")
        });
        if constants && code {
            return Ok(Format::TorchScript);
        }
        if names.iter().any(|n| n.ends_with(".pkl")) {
            return Ok(Format::ZipPickle);
        }
        return Ok(Format::Other);
    }
    // Protocol 0 and 1 pickles have no `PROTO` prefix: a weight file of a
    // pickle's kind (by name) that starts with an opcode and ends with
    // `STOP` is one, unless it has a safetensors header.
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    if ext.is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.as_str()))
        && head.first().is_some_and(|b| PICKLE_STARTS.contains(b))
    {
        let len = f.metadata()?.len();
        let mut last = [0u8; 1];
        f.seek(SeekFrom::End(-1))?;
        f.read_exact(&mut last)?;
        let safetensors = head.len() >= 9
            && head[8] == b'{'
            && u64::from_le_bytes(head[..8].try_into().expect("8 bytes"))
                .checked_add(8)
                .is_some_and(|h| h <= len);
        if last[0] == b'.' && !safetensors {
            return Ok(Format::Pickle);
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

    #[test]
    fn protocol_0_and_1_pickles_are_pickles() {
        let dir = tempfile::tempdir().unwrap();
        // pickle.dumps(..., protocol=0) and protocol=1 of a class reference.
        for (name, bytes) in [
            ("p0.bin", &b"cos\nsystem\n(S'echo hi'\ntR."[..]),
            ("p0.pt", &b"(dp0\nS'a'\np1\nI1\ns."[..]),
            ("p1.pth", &b"}q\x00X\x01\x00\x00\x00aq\x01K\x01s."[..]),
            ("p1.ckpt", &b"]q\x00(K\x01K\x02e."[..]),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            assert_eq!(sniff(&p).unwrap(), Format::Pickle, "{name}");
        }
        // Not weight files of a pickle's kind, or not a pickle's shape.
        for (name, bytes) in [
            ("c.json", &b"(x)."[..]),
            ("t.bin", &b"(no stop at the end"[..]),
            ("s.txt", &b"cos\nsystem\n."[..]),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            assert_eq!(sniff(&p).unwrap(), Format::Other, "{name}");
        }
        // A safetensors file named .bin whose header length starts like an opcode.
        let header = br#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let mut st = (header.len() as u64).to_le_bytes().to_vec();
        st[0] = b'K';
        st.truncate(8);
        let mut header = header.to_vec();
        header.resize(u64::from_le_bytes(st[..8].try_into().unwrap()) as usize, b' ');
        st.extend_from_slice(&header);
        st.push(b'.');
        let p = dir.path().join("st.bin");
        std::fs::write(&p, &st).unwrap();
        assert_eq!(sniff(&p).unwrap(), Format::Other);
    }

    #[test]
    fn an_empty_code_folder_is_not_torchscript() {
        let dir = tempfile::tempdir().unwrap();
        let zipped = dir.path().join("sd.pt");
        let mut w = zip::ZipWriter::new(File::create(&zipped).unwrap());
        w.add_directory("archive/code/", zip::write::FileOptions::default()).unwrap();
        w.start_file("archive/data.pkl", zip::write::FileOptions::default()).unwrap();
        w.write_all(&[0x80, 0x02, b'.']).unwrap();
        w.finish().unwrap();
        assert_eq!(sniff(&zipped).unwrap(), Format::ZipPickle);
        // constants.pkl without code is not TorchScript either.
        let mut w = zip::ZipWriter::new(File::create(&zipped).unwrap());
        w.start_file("archive/constants.pkl", zip::write::FileOptions::default()).unwrap();
        w.write_all(&[0x80, 0x02, b'.']).unwrap();
        w.start_file("archive/code/", zip::write::FileOptions::default()).unwrap();
        w.finish().unwrap();
        assert_eq!(sniff(&zipped).unwrap(), Format::ZipPickle);
    }
}
