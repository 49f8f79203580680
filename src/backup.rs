//! Backups of one peer (SPEC.md §2 rule 10): `<version>_<serial>_<date>_<time>_backup.tar.gz`,
//! or `.tar.gz.enc` when a password is given.
//!
//! A backup is a gzip'd tar of a `manifest.json` (version, serial, time, and the SHA-256 of every
//! other member) and the members themselves (configuration file, store export). Logs are never
//! included. An encrypted backup is `CMBKENC1 | salt(16) | nonce(12) | AES-256-GCM(tar.gz)` with the
//! key derived from the password by Argon2id, so a wrong password and a damaged file are both
//! detected before anything is restored. [`open`] checks everything in memory and hands back the
//! members only when all is well, so a refused restore changes nothing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::eventlog::rfc3339;

const ENC_MAGIC: &[u8; 8] = b"CMBKENC1";
/// Largest backup accepted for restore; far above a real one, it bounds memory on a bad file.
pub const MAX_BACKUP_BYTES: u64 = 256 << 20;

/// Why a restore was refused; each says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The file could not be read.
    #[error("cannot read the backup: {0}")]
    Io(#[from] std::io::Error),
    /// The file is encrypted and no password was given.
    #[error("the backup is encrypted; give its password with --password-file")]
    PasswordNeeded,
    /// Decryption failed: wrong password or damaged ciphertext (AEAD cannot tell which).
    #[error("wrong password, or the encrypted backup is damaged")]
    WrongPassword,
    /// The archive, manifest or a member's checksum is wrong.
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    /// The backup was taken on another peer.
    #[error(
        "this backup was taken on the peer with serial {found}, not on this one ({expected}); a backup restores only onto the peer it was taken from"
    )]
    OtherPeer {
        /// Serial in the backup.
        found: String,
        /// This peer's serial.
        expected: String,
    },
}

/// What a backup says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Software version that took it.
    pub version: String,
    /// Serial of the peer it was taken on.
    pub serial: String,
    /// When, RFC 3339 UTC.
    pub created: String,
    /// Member name → hex SHA-256.
    pub members: Vec<(String, String)>,
}

/// The file name for a backup taken at `ts_ms` (SPEC.md §2 rule 10).
pub fn file_name(version: &str, serial: &str, ts_ms: u64, encrypted: bool) -> String {
    let t = rfc3339(ts_ms); // 2026-11-25T07:11:56.000Z
    let date: String = t[..10].chars().filter(|c| c.is_ascii_digit()).collect();
    let time: String = t[11..19].chars().filter(|c| c.is_ascii_digit()).collect();
    format!(
        "{version}_{serial}_{date}_{time}_backup.tar.gz{}",
        if encrypted { ".enc" } else { "" }
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn derive_key(password: &[u8], salt: &[u8]) -> Result<Zeroizing<[u8; 32]>, String> {
    let mut key = Zeroizing::new([0u8; 32]);
    argon2::Argon2::default()
        .hash_password_into(password, salt, key.as_mut())
        .map_err(|e| e.to_string())?;
    Ok(key)
}

/// The files of a backup: name in the archive and contents.
pub type Members = Vec<(String, Vec<u8>)>;

/// Writes a backup of `members` into `dir` and returns its path. The file is written to a
/// temporary name, synced and renamed, so a crash never leaves a half backup under the real name.
pub fn create(
    dir: &Path,
    version: &str,
    serial: &str,
    ts_ms: u64,
    members: &[(String, Vec<u8>)],
    password: Option<&[u8]>,
) -> std::io::Result<PathBuf> {
    let manifest = Manifest {
        version: version.to_owned(),
        serial: serial.to_owned(),
        created: rfc3339(ts_ms),
        members: members
            .iter()
            .map(|(n, b)| (n.clone(), hex(&Sha256::digest(b))))
            .collect(),
    };
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
    let entries = std::iter::once(("manifest.json", manifest_bytes.as_slice()))
        .chain(members.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(ts_ms / 1000);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes)?;
    }
    let gz = tar.into_inner()?.finish()?;
    let out = match password {
        None => gz,
        Some(pw) => {
            let rng = SystemRandom::new();
            let mut salt = [0u8; 16];
            let mut nonce = [0u8; 12];
            rng.fill(&mut salt)
                .and_then(|()| rng.fill(&mut nonce))
                .map_err(|_| std::io::Error::other("no randomness"))?;
            let key = derive_key(pw, &salt).map_err(std::io::Error::other)?;
            let key = LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key.as_ref())
                    .map_err(|_| std::io::Error::other("bad key"))?,
            );
            let mut data = gz;
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ENC_MAGIC),
                &mut data,
            )
            .map_err(|_| std::io::Error::other("encryption failed"))?;
            let mut out = Vec::with_capacity(8 + 16 + 12 + data.len());
            out.extend_from_slice(ENC_MAGIC);
            out.extend_from_slice(&salt);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&data);
            out
        }
    };
    std::fs::create_dir_all(dir)?;
    let path = dir.join(file_name(version, serial, ts_ms, password.is_some()));
    let tmp = path.with_extension("partial");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Reads and checks a backup for the peer with serial `expected_serial`; returns its manifest and
/// members only if everything is right.
pub fn open(
    path: &Path,
    password: Option<&[u8]>,
    expected_serial: &str,
) -> Result<(Manifest, Members), RestoreError> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_BACKUP_BYTES {
        return Err(RestoreError::Damaged(format!(
            "{len} bytes is larger than any backup ({MAX_BACKUP_BYTES} at most)"
        )));
    }
    let bytes = std::fs::read(path)?;
    let gz = if bytes.starts_with(ENC_MAGIC) {
        let pw = password.ok_or(RestoreError::PasswordNeeded)?;
        if bytes.len() < 8 + 16 + 12 + 16 {
            return Err(RestoreError::Damaged(
                "the encrypted file is truncated".into(),
            ));
        }
        let (salt, rest) = bytes[8..].split_at(16);
        let (nonce, sealed) = rest.split_at(12);
        let key = derive_key(pw, salt).map_err(RestoreError::Damaged)?;
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, key.as_ref()).map_err(|_| RestoreError::WrongPassword)?,
        );
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| RestoreError::WrongPassword)?;
        let mut data = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(ENC_MAGIC), &mut data)
            .map_err(|_| RestoreError::WrongPassword)?;
        plain.to_vec()
    } else {
        bytes
    };
    let mut archive = tar::Archive::new(GzDecoder::new(gz.as_slice()).take(MAX_BACKUP_BYTES));
    let mut files = Vec::new();
    for entry in archive
        .entries()
        .map_err(|e| RestoreError::Damaged(e.to_string()))?
    {
        let mut entry = entry.map_err(|e| RestoreError::Damaged(e.to_string()))?;
        let name = entry
            .path()
            .map_err(|e| RestoreError::Damaged(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| RestoreError::Damaged(e.to_string()))?;
        files.push((name, data));
    }
    let Some(pos) = files.iter().position(|(n, _)| n == "manifest.json") else {
        return Err(RestoreError::Damaged(
            "no manifest.json: not a confmesh backup".into(),
        ));
    };
    let (_, manifest_bytes) = files.remove(pos);
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| RestoreError::Damaged(format!("unreadable manifest: {e}")))?;
    if manifest.members.len() != files.len() {
        return Err(RestoreError::Damaged(
            "the manifest and the archive list different members".into(),
        ));
    }
    for (name, sum) in &manifest.members {
        let Some((_, data)) = files.iter().find(|(n, _)| n == name) else {
            return Err(RestoreError::Damaged(format!("member {name} is missing")));
        };
        if &hex(&Sha256::digest(data)) != sum {
            return Err(RestoreError::Damaged(format!(
                "member {name} does not match its checksum"
            )));
        }
    }
    if manifest.serial != expected_serial {
        return Err(RestoreError::OtherPeer {
            found: manifest.serial,
            expected: expected_serial.to_owned(),
        });
    }
    Ok((manifest, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members() -> Members {
        vec![
            (
                "confmesh.toml".into(),
                b"[peer]\nhostname=\"c1\"\n".to_vec(),
            ),
            ("store.json".into(), br#"{"bridge/b1":{}}"#.to_vec()),
        ]
    }

    /// A backup of `members()` for peer CM1 taken at `ts_ms`, the file the round-trip and
    /// refusal tests open.
    fn backup_of_cm1(dir: &Path, ts_ms: u64, password: Option<&[u8]>) -> PathBuf {
        create(dir, "0.1.0", "CM1", ts_ms, &members(), password).unwrap()
    }

    #[test]
    fn name_follows_the_rule() {
        assert_eq!(
            file_name("0.1.0", "CM0001", 1_795_000_000_000, false),
            "0.1.0_CM0001_20261118_110640_backup.tar.gz"
        );
        assert!(file_name("0.1.0", "CM0001", 0, true).ends_with("_backup.tar.gz.enc"));
    }

    #[test]
    fn round_trips_plain_and_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let p = backup_of_cm1(dir.path(), 1_795_000_000_000, None);
        let (m, files) = open(&p, None, "CM1").unwrap();
        assert_eq!(m.serial, "CM1");
        assert_eq!(files, members());
        let p = backup_of_cm1(dir.path(), 1_795_000_001_000, Some(b"pw"));
        assert!(p.to_string_lossy().ends_with(".enc"));
        assert_eq!(open(&p, Some(b"pw"), "CM1").unwrap().1, members());
        assert!(matches!(
            open(&p, Some(b"wrong"), "CM1"),
            Err(RestoreError::WrongPassword)
        ));
        assert!(matches!(
            open(&p, None, "CM1"),
            Err(RestoreError::PasswordNeeded)
        ));
    }

    #[test]
    fn refuses_other_peer_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = backup_of_cm1(dir.path(), 1_795_000_000_000, None);
        assert!(matches!(
            open(&p, None, "CM2"),
            Err(RestoreError::OtherPeer { .. })
        ));
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            open(&p, None, "CM1"),
            Err(RestoreError::Damaged(_))
        ));
        std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
        assert!(matches!(
            open(&p, None, "CM1"),
            Err(RestoreError::Damaged(_))
        ));
    }
}
