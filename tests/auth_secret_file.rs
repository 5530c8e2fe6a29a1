//! The secret file: created with owner-only permissions, never overwritten (also under concurrent
//! creation), refused when group or others can access it, refused when malformed.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Barrier};

use geobeat::auth::{Secret, SecretError};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn created_owner_only_and_reloaded() {
    // load_or_create makes parent dirs and a 0600-or-stricter hex file; later loads agree.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("a/b/secret");
    let s = Secret::load_or_create(&path).unwrap();
    let m = mode(&path);
    assert_eq!(m & 0o077, 0, "mode {m:o} must deny group and others");
    assert_ne!(m & 0o400, 0, "owner must read");
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.trim(), s.to_hex());
    assert_eq!(text.len(), 65);
    assert_eq!(Secret::load(&path).unwrap(), s);
    assert_eq!(
        Secret::load_or_create(&path).unwrap(),
        s,
        "never regenerated"
    );
    let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec![std::ffi::OsString::from("secret")],
        "no temp files left"
    );
}

#[test]
fn group_or_world_access_is_refused() {
    // Modes 0640, 0604 and 0660 are refused with an error naming the path and mode.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("secret");
    let s = Secret::load_or_create(&path).unwrap();
    for bad in [0o640, 0o604, 0o660, 0o602] {
        fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
        let err = Secret::load(&path).unwrap_err();
        assert!(
            matches!(err, SecretError::Permissions { mode, .. } if mode == bad),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(msg.contains(&format!("{bad:04o}")), "{msg}");
        assert!(
            Secret::load_or_create(&path).is_err(),
            "not silently replaced"
        );
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    assert_eq!(
        Secret::load(&path).unwrap(),
        s,
        "read-only for the owner is fine"
    );
}

#[test]
fn malformed_and_missing_files() {
    // Garbage content is a Format error naming the file; a missing file is an Io error.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("secret");
    fs::write(&path, "not a secret\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let err = Secret::load(&path).unwrap_err();
    assert!(matches!(err, SecretError::Format { .. }), "{err}");
    assert!(err.to_string().contains(path.to_str().unwrap()));
    let err = Secret::load(&tmp.path().join("missing")).unwrap_err();
    assert!(matches!(err, SecretError::Io { op: "open", .. }), "{err}");
    let err = Secret::load(tmp.path()).unwrap_err();
    assert!(
        matches!(err, SecretError::Io { .. }),
        "a directory is not a secret file: {err}"
    );
}

#[test]
fn concurrent_creation_agrees_on_one_secret() {
    // Eight threads racing to create the same file all end up with the same secret.
    let tmp = tempfile::tempdir().unwrap();
    let path = Arc::new(tmp.path().join("secret"));
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Secret::load_or_create(&path).unwrap()
            })
        })
        .collect();
    let secrets: Vec<Secret> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(secrets.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(Secret::load(&path).unwrap(), secrets[0]);
}
