//! Bounded, prompt reads of outside files (issue 10, item 5): special files
//! are typed errors at once, and no read goes past `max_bytes + 1` bytes,
//! whatever the path names. Every loader of outside data goes through
//! `lora::read_file`, so each case is checked through the public loaders too.

#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use safe_fedllm::Error;
use safe_fedllm::lora::{LoraAdapter, ReadLimits, read_file};
use safe_fedllm::probe::{LinearProbe, Manifest};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("safe-fedllm-read-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `f` on another thread and fails the test if it does not return within
/// five seconds (a blocking open of a FIFO would otherwise hang the suite).
fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the read blocked instead of failing at once")
}

fn assert_not_a_file(err: &Error, path: &Path, expected_kind: &str) {
    match err.root() {
        Error::NotAFile { path: p, kind } => {
            assert_eq!(p, path);
            assert_eq!(*kind, expected_kind);
        }
        other => panic!("expected NotAFile, got {other:?}"),
    }
}

/// Every public loader of outside data on `path`.
fn all_loaders(path: &Path) -> Vec<Error> {
    vec![
        read_file(path, &ReadLimits::default()).unwrap_err(),
        LoraAdapter::load(path).unwrap_err(),
        LinearProbe::load(path).unwrap_err(),
        Manifest::load(path).unwrap_err(),
    ]
}

#[test]
fn fifo_is_refused_without_blocking() {
    let dir = scratch("fifo");
    let fifo = dir.join("upload.safetensors");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(status.success());
    let path = fifo.clone();
    let errors = promptly(move || all_loaders(&path));
    for err in &errors {
        assert_not_a_file(err, &fifo, "FIFO");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn dev_zero_is_refused_without_reading() {
    let path = PathBuf::from("/dev/zero");
    let errors = promptly(move || all_loaders(Path::new("/dev/zero")));
    for err in &errors {
        assert_not_a_file(err, &path, "character device");
    }
}

#[test]
fn directory_is_refused() {
    let dir = scratch("dir");
    for err in &all_loaders(&dir) {
        assert_not_a_file(err, &dir, "directory");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn socket_is_refused_without_blocking() {
    let dir = scratch("socket");
    let sock = dir.join("probe.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let path = sock.clone();
    let errors = promptly(move || all_loaders(&path));
    for err in &errors {
        assert_not_a_file(err, &sock, "socket");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_file_is_io_error() {
    let dir = scratch("missing");
    let path = dir.join("nope.safetensors");
    match read_file(&path, &ReadLimits::default()).unwrap_err() {
        Error::Io { path: p, source } => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn file_over_the_limit_is_refused_before_reading() {
    let dir = scratch("big");
    let path = dir.join("big.safetensors");
    std::fs::write(&path, vec![0u8; 4097]).unwrap();
    let limits = ReadLimits {
        max_bytes: 4096,
        ..ReadLimits::default()
    };
    let err = read_file(&path, &limits).unwrap_err();
    assert!(
        matches!(&err, Error::InFile { path: p, .. } if *p == path),
        "{err:?}"
    );
    assert!(matches!(
        err.root(),
        Error::InputTooLarge {
            found: 4097,
            limit: 4096
        }
    ));
    // Exactly at the limit is accepted.
    std::fs::write(&path, vec![7u8; 4096]).unwrap();
    assert_eq!(read_file(&path, &limits).unwrap(), vec![7u8; 4096]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A file whose reported size is below the limit but whose content is not
/// (procfs reports 0 bytes; a file can also grow between `stat` and `read`):
/// the read stops at `max_bytes + 1` bytes and fails with the same error.
#[test]
fn file_larger_than_its_reported_size_is_cut_at_the_limit() {
    let path = Path::new("/proc/self/status");
    if !path.exists() {
        return; // not Linux
    }
    assert_eq!(std::fs::metadata(path).unwrap().len(), 0);
    let limits = ReadLimits {
        max_bytes: 16,
        ..ReadLimits::default()
    };
    let err = read_file(path, &limits).unwrap_err();
    assert!(matches!(
        err.root(),
        Error::InputTooLarge {
            found: 17,
            limit: 16
        }
    ));
}

#[test]
fn default_limit_is_sized_for_lora_uploads() {
    let limits = ReadLimits::default();
    // Llama-3.1-405B, r = 8 on all seven projections, f32: 126 layers ×
    // 8 × Σ(in + out) values.
    let per_layer: u64 = 8 * (2 * (16_384 + 16_384) + 2 * (16_384 + 1_024) + 3 * (16_384 + 53_248));
    let bytes_405b_r8 = 126 * per_layer * 4;
    assert!(bytes_405b_r8 < limits.max_bytes);
    assert_eq!(limits.max_bytes, 2 << 30);
    assert_eq!(limits.max_bytes, ReadLimits::DEFAULT_MAX_BYTES);
}
