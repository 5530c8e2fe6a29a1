//! Credentials for simulated devices. Three sources: one gateway token shared by every
//! connection (each heartbeat then carries `"id":"<prefix><n>"`), a tokens file of `id<TAB>token`
//! lines (one device token per connection), or — with the `mint` feature — device tokens minted
//! locally from the server's secret file through `geobeat::auth`. It owns mapping a device's
//! global index to (token, id-in-frames); it does not own HTTP headers or connections. Invariant:
//! device n of a run always gets the same credential, whichever process or thread runs it.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::frame::DEVICE_ID_BYTES_MAX;

/// Why credentials could not be prepared.
#[derive(Debug, Error)]
pub enum TokenError {
    /// The tokens file could not be read.
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tokens file line is not `id<TAB>token`.
    #[error("{path}:{line}: expected `id<TAB>token`")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// The run needs more devices than the tokens file provides.
    #[error("tokens file {path} has {available} entries, the run needs device index {needed}")]
    TooFew {
        /// The file.
        path: PathBuf,
        /// Entries in the file.
        available: usize,
        /// Highest device index requested.
        needed: usize,
    },
    /// A generated device id would exceed the protocol's length limit.
    #[error("device id {id:?} is longer than {max} bytes", max = DEVICE_ID_BYTES_MAX)]
    IdTooLong {
        /// The offending id.
        id: String,
    },
    /// The secret file could not be loaded (feature `mint`).
    #[error("cannot load secret {path}: {message}")]
    Secret {
        /// The secret file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// What one device connection presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredential {
    /// Bearer token for the upgrade request.
    pub token: String,
    /// Id carried in every heartbeat (gateway mode), or `None` when the token names the device.
    pub frame_id: Option<String>,
    /// The device's id: the generated `<prefix><n>` (gateway, minted) or the tokens file's id.
    /// MQTT sends it as the CONNECT user name and in the topic.
    pub device_id: String,
}

/// Where device credentials come from.
pub enum Credentials {
    /// One gateway token; device n sends `"id":"<id_prefix><n>"` in every heartbeat.
    Gateway {
        /// The gateway token.
        token: String,
        /// Prefix of generated device ids.
        id_prefix: String,
    },
    /// Device tokens read from a file; device n uses line n (0-based).
    Table {
        /// `(id, token)` pairs in file order.
        entries: Vec<(String, String)>,
    },
    /// Device tokens minted from the server's secret; device n is `<id_prefix><n>`.
    #[cfg(feature = "mint")]
    Mint {
        /// The server's signing secret.
        secret: geobeat::auth::Secret,
        /// Prefix of generated device ids.
        id_prefix: String,
        /// Expiry of minted tokens, seconds since the Unix epoch.
        expires_at_s: u64,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens and secrets stay out of logs.
        match self {
            Credentials::Gateway { id_prefix, .. } => f
                .debug_struct("Gateway")
                .field("id_prefix", id_prefix)
                .finish(),
            Credentials::Table { entries } => f
                .debug_struct("Table")
                .field("entries", &entries.len())
                .finish(),
            #[cfg(feature = "mint")]
            Credentials::Mint { id_prefix, .. } => f
                .debug_struct("Mint")
                .field("id_prefix", id_prefix)
                .finish(),
        }
    }
}

impl Credentials {
    /// Reads a tokens file: one `id<TAB>token` per line; blank lines and `#` comments skipped.
    pub fn from_tokens_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut entries = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, token) = line
                .split_once('\t')
                .filter(|(id, token)| !id.is_empty() && !token.trim().is_empty())
                .ok_or(TokenError::Line {
                    path: path.to_owned(),
                    line: index + 1,
                })?;
            entries.push((id.to_owned(), token.trim().to_owned()));
        }
        Ok(Credentials::Table { entries })
    }

    /// Loads the server's secret file and mints device tokens valid for `valid_s` seconds.
    #[cfg(feature = "mint")]
    pub fn mint_from_secret(
        path: &Path,
        id_prefix: String,
        valid_s: u64,
    ) -> Result<Self, TokenError> {
        let secret = geobeat::auth::Secret::load(path).map_err(|e| TokenError::Secret {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Credentials::Mint {
            secret,
            id_prefix,
            expires_at_s: now_s + valid_s,
        })
    }

    /// Checks up front that devices `0..devices` all have a credential.
    pub fn check(&self, devices: usize) -> Result<(), TokenError> {
        if devices == 0 {
            return Ok(());
        }
        match self {
            Credentials::Table { entries } if entries.len() < devices => Err(TokenError::TooFew {
                path: PathBuf::from("(tokens file)"),
                available: entries.len(),
                needed: devices - 1,
            }),
            _ => self.for_device(devices - 1).map(|_| ()),
        }
    }

    /// The credential of the device with global index `index`.
    pub fn for_device(&self, index: usize) -> Result<DeviceCredential, TokenError> {
        match self {
            Credentials::Gateway { token, id_prefix } => {
                let id = generated_id(id_prefix, index)?;
                Ok(DeviceCredential {
                    token: token.clone(),
                    frame_id: Some(id.clone()),
                    device_id: id,
                })
            }
            Credentials::Table { entries } => {
                let (id, token) = entries.get(index).ok_or_else(|| TokenError::TooFew {
                    path: PathBuf::from("(tokens file)"),
                    available: entries.len(),
                    needed: index,
                })?;
                Ok(DeviceCredential {
                    token: token.clone(),
                    frame_id: None,
                    device_id: id.clone(),
                })
            }
            #[cfg(feature = "mint")]
            Credentials::Mint {
                secret,
                id_prefix,
                expires_at_s,
            } => {
                let id = generated_id(id_prefix, index)?;
                let scope = geobeat::auth::Scope::Device(id.clone());
                // Issue time 0 (not the wall clock), so every process mints device n the same
                // token; a revocation of the device would refuse it, as it should.
                let token = geobeat::auth::try_mint(secret, &scope, 0, *expires_at_s)
                    .unwrap_or_else(|e| panic!("{e}"));
                Ok(DeviceCredential {
                    token,
                    frame_id: None,
                    device_id: id,
                })
            }
        }
    }
}

/// `<prefix><index>`, checked against the protocol's id length limit.
fn generated_id(prefix: &str, index: usize) -> Result<String, TokenError> {
    let id = format!("{prefix}{index}");
    if id.len() > DEVICE_ID_BYTES_MAX {
        return Err(TokenError::IdTooLong { id });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_mode_generates_ids_per_device() {
        // Checks that every device shares the gateway token and gets `<prefix><index>` as id,
        // and that an over-long id is refused up front by `check`.
        let creds = Credentials::Gateway {
            token: "gw".into(),
            id_prefix: "sim-".into(),
        };
        assert_eq!(
            creds.for_device(41).unwrap(),
            DeviceCredential {
                token: "gw".into(),
                frame_id: Some("sim-41".into()),
                device_id: "sim-41".into(),
            }
        );
        creds.check(10_000).unwrap();
        let long = Credentials::Gateway {
            token: "gw".into(),
            id_prefix: "p".repeat(63),
        };
        assert!(matches!(long.check(11), Err(TokenError::IdTooLong { .. })));
    }

    #[test]
    fn tokens_file_maps_lines_to_devices() {
        // Checks parsing of a tokens file with a comment and a blank line, index mapping,
        // a too-short file, and a malformed line.
        let dir = std::env::temp_dir().join(format!("geobeat-perf-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.tsv");
        std::fs::write(&good, "# id\ttoken\nd0\ttok0\n\nd1\ttok1\r\n").unwrap();
        let creds = Credentials::from_tokens_file(&good).unwrap();
        assert_eq!(
            creds.for_device(1).unwrap(),
            DeviceCredential {
                token: "tok1".into(),
                frame_id: None,
                device_id: "d1".into(),
            }
        );
        creds.check(2).unwrap();
        assert!(matches!(
            creds.check(3),
            Err(TokenError::TooFew { available: 2, .. })
        ));
        let bad = dir.join("bad.tsv");
        std::fs::write(&bad, "d0 tok0\n").unwrap();
        assert!(matches!(
            Credentials::from_tokens_file(&bad),
            Err(TokenError::Line { line: 1, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
