//! Secrets at rest and passwords.
//!
//! - [`MasterKey`]: 32 random bytes that encrypt every stored provider and Stripe secret
//!   (XChaCha20-Poly1305, a fresh random nonce per value). In development it is generated
//!   once into `<data_dir>/master.key`; production must supply it.
//! - Every sealed value is bound to the row it belongs to ([`SealedFor`], the cipher's
//!   associated data): copied into another row, it no longer opens.
//! - Passwords are hashed with argon2id (PHC strings), never stored or logged in clear.

use std::fmt;
use std::path::{Path, PathBuf};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
/// Sealed without associated data (before values were bound to their row): still opened, and
/// re-sealed as [`SEALED_PREFIX`] at startup.
const SEALED_PREFIX_V1: &str = "v1:";
/// Sealed with the associated data of [`SealedFor`].
const SEALED_PREFIX: &str = "v2:";

/// The row a sealed value belongs to: its associated data, so a value copied into another
/// row (another project's, another provider's) fails to open instead of serving there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFor(String);

impl SealedFor {
    pub fn provider_api_key(provider: &crate::ids::ProviderId) -> Self {
        Self(format!("provider_api_key:{provider}"))
    }

    pub fn stripe_secret_key(project: &crate::ids::ProjectId) -> Self {
        Self(format!("stripe_secret_key:{project}"))
    }

    pub fn stripe_webhook_secret(project: &crate::ids::ProjectId) -> Self {
        Self(format!("stripe_webhook_secret:{project}"))
    }

    /// The signing secret of the project's Stripe event destination (thin events).
    pub fn stripe_event_secret(project: &crate::ids::ProjectId) -> Self {
        Self(format!("stripe_event_secret:{project}"))
    }

    pub fn alert_webhook_secret(project: &crate::ids::ProjectId) -> Self {
        Self(format!("alert_webhook_secret:{project}"))
    }

    /// A stored answer of the management API under an `Idempotency-Key` (project ids hold no
    /// `:`, so the key after them is unambiguous).
    pub fn idempotent_response(project: &crate::ids::ProjectId, key: &str) -> Self {
        Self(format!("idempotency:{project}:{key}"))
    }
}

/// The key that encrypts secrets at rest. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct MasterKey([u8; KEY_LEN]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("expected 32 bytes in standard base64 (44 characters)")]
    Malformed,
    #[error("cannot read or create the master key file {path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the stored secret is not in a known format")]
    Format,
    #[error("the stored secret cannot be decrypted with this master key for this row")]
    WrongKey,
}

impl MasterKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::fill(&mut bytes);
        Self(bytes)
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = B64.decode(text.trim()).map_err(|_| KeyError::Malformed)?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyError::Malformed)?;
        Ok(Self(bytes))
    }

    /// The key in the form `TOLLGATE_MASTER_KEY` takes. Only for showing to an operator once.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Reads the key kept in `path`, or creates it (readable by its owner only) when absent.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |e: std::io::Error| KeyError::Io { path: path.to_path_buf(), reason: e.to_string() };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_base64(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let key = Self::generate();
                write_private(path, &key.to_base64()).map_err(io)?;
                tracing::info!(path = %path.display(), "generated a new master key");
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A key for one purpose, derived from the master key (HMAC-SHA256 of the purpose), so a
    /// key used to sign tokens is never the key that encrypts secrets.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        hmac_sha256(&self.0, purpose.as_bytes())
    }

    /// Encrypts `plaintext` for the row `row` into a printable string
    /// (`v2:<base64 nonce‖ciphertext>`, the row as associated data).
    pub fn seal(&self, plaintext: &str, row: &SealedFor) -> String {
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let payload = Payload { msg: plaintext.as_bytes(), aad: row.0.as_bytes() };
        // Encryption with a valid key and nonce length cannot fail for in-memory buffers.
        let ciphertext = cipher.encrypt(XNonce::from_slice(&nonce), payload).unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        format!("{SEALED_PREFIX}{}", B64.encode(out))
    }

    /// Decrypts a value sealed for `row`. A `v2` value sealed for another row fails
    /// ([`SealError::WrongKey`]); a `v1` value (from before values were bound) still opens,
    /// with a warning, until the startup pass re-seals it.
    pub fn open(&self, sealed: &str, row: &SealedFor) -> Result<String, SealError> {
        if let Some(body) = sealed.strip_prefix(SEALED_PREFIX) {
            return self.decrypt(body, row.0.as_bytes());
        }
        let body = sealed.strip_prefix(SEALED_PREFIX_V1).ok_or(SealError::Format)?;
        tracing::warn!(row = %row.0, "opened a secret sealed without its row (v1); it is re-sealed at the next start");
        self.decrypt(body, b"")
    }

    /// Whether `sealed` is in the old, unbound format that [`MasterKey::reseal`] upgrades.
    pub fn is_unbound(sealed: &str) -> bool {
        sealed.starts_with(SEALED_PREFIX_V1)
    }

    /// A `v1` value sealed again, bound to `row`; `None` when it is not `v1`.
    pub fn reseal(&self, sealed: &str, row: &SealedFor) -> Result<Option<String>, SealError> {
        let Some(body) = sealed.strip_prefix(SEALED_PREFIX_V1) else {
            return Ok(None);
        };
        Ok(Some(self.seal(&self.decrypt(body, b"")?, row)))
    }

    fn decrypt(&self, body: &str, aad: &[u8]) -> Result<String, SealError> {
        let bytes = B64.decode(body).map_err(|_| SealError::Format)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::Format);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let plain = cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad })
            .map_err(|_| SealError::WrongKey)?;
        String::from_utf8(plain).map_err(|_| SealError::Format)
    }

    /// Seals as the old format did (no associated data): for tests of the upgrade path only.
    #[doc(hidden)]
    pub fn seal_unbound_for_tests(&self, plaintext: &str) -> String {
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let ciphertext = cipher.encrypt(XNonce::from_slice(&nonce), plaintext.as_bytes()).unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ciphertext);
        format!("{SEALED_PREFIX_V1}{}", B64.encode(out))
    }
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

#[derive(Debug, thiserror::Error)]
#[error("password hashing failed")]
pub struct PasswordHashError;

/// Hashes a password with argon2id and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, PasswordHashError> {
    Argon2::default().hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|_| PasswordHashError)
}

/// Whether `password` matches the PHC string `hash`. A malformed hash never matches.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// HMAC-SHA256 with a 32-byte key. HMAC zero-pads keys shorter than its 64-byte block, so
/// padding here gives the same MAC, through the constructor that cannot fail.
pub fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    use hmac::digest::KeyInit;
    use hmac::{Hmac, Mac};
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new(&block.into());
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 with a key of any length (a webhook signing secret, say). Keys longer than
/// the block are hashed first and shorter ones zero-padded, as HMAC defines.
pub fn hmac_sha256_any_key(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::digest::KeyInit;
    use hmac::{Hmac, Mac};
    use sha2::Digest;
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&sha2::Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new(&block.into());
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// A valid argon2id hash of a random password, verified against when an account does not
/// exist so that a login takes as long whether or not the email is known.
pub fn dummy_password_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password(&random_token()).unwrap_or_default())
}

/// A random URL-safe token of 192 bits (reset links, invitations, CSRF).
pub fn random_token() -> String {
    let mut bytes = [0u8; 24];
    rand::fill(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The SHA-256 (hex) under which a token is stored.
pub fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hmac_with_any_key_matches_rfc_4231() {
        // RFC 4231, test cases 2 (short key) and 6 (key longer than the block).
        let mac = super::hmac_sha256_any_key(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let key = [0xaau8; 131];
        let mac = super::hmac_sha256_any_key(&key, b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(hex::encode(mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    use super::*;

    #[test]
    fn hmac_with_a_padded_key_is_hmac_with_the_key() {
        use hmac::Mac;
        let key = [7u8; 32];
        let mut reference = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
        reference.update(b"message");
        let expected: [u8; 32] = reference.finalize().into_bytes().into();
        assert_eq!(hmac_sha256(&key, b"message"), expected);
    }

    fn row(n: u8) -> SealedFor {
        SealedFor(format!("provider_api_key:prv_{n}"))
    }

    #[test]
    fn seal_round_trips_and_differs_each_time() {
        let key = MasterKey::generate();
        let a = key.seal("sk-live-123", &row(1));
        let b = key.seal("sk-live-123", &row(1));
        assert_ne!(a, b, "nonce must be fresh");
        assert!(a.starts_with("v2:"));
        assert!(!a.contains("sk-live"));
        assert_eq!(key.open(&a, &row(1)).unwrap(), "sk-live-123");
        assert!(matches!(MasterKey::generate().open(&a, &row(1)), Err(SealError::WrongKey)));
        assert!(matches!(key.open("plain", &row(1)), Err(SealError::Format)));
    }

    #[test]
    fn a_sealed_value_opens_only_for_its_row() {
        let key = MasterKey::generate();
        let a = key.seal("sk-live-123", &row(1));
        assert!(matches!(key.open(&a, &row(2)), Err(SealError::WrongKey)));
        let project = crate::ids::ProjectId::generate();
        let s = key.seal("whsec_x", &SealedFor::stripe_webhook_secret(&project));
        assert!(key.open(&s, &SealedFor::stripe_secret_key(&project)).is_err());
        assert!(key.open(&s, &SealedFor::stripe_webhook_secret(&crate::ids::ProjectId::generate())).is_err());
        assert_eq!(key.open(&s, &SealedFor::stripe_webhook_secret(&project)).unwrap(), "whsec_x");
    }

    #[test]
    fn v1_values_still_open_and_reseal_bound_to_their_row() {
        let key = MasterKey::generate();
        let old = key.seal_unbound_for_tests("sk-old");
        assert!(MasterKey::is_unbound(&old));
        // Opened wherever found, so an upgrade never loses a secret.
        assert_eq!(key.open(&old, &row(1)).unwrap(), "sk-old");
        let new = key.reseal(&old, &row(1)).unwrap().unwrap();
        assert!(new.starts_with("v2:") && !MasterKey::is_unbound(&new));
        assert_eq!(key.open(&new, &row(1)).unwrap(), "sk-old");
        assert!(key.open(&new, &row(2)).is_err());
        // Re-sealing is idempotent: a v2 value is left alone.
        assert_eq!(key.reseal(&new, &row(1)).unwrap(), None);
        assert!(matches!(MasterKey::generate().reseal(&old, &row(1)), Err(SealError::WrongKey)));
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/master.key");
        let k1 = MasterKey::load_or_create(&path).unwrap();
        let k2 = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(k1.to_base64(), k2.to_base64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!format!("{k1:?}").contains(&k1.to_base64()));
    }

    #[test]
    fn passwords_hash_with_argon2id() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("correct horse", "not-a-hash"));
    }
}
