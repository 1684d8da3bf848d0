//! Write keys: which keys may write which databases.
//!
//! Keys are kept only as SHA-256 digests (a plain `key:` in the file is hashed at start-up), and a
//! presented key is hashed once and compared with every configured digest in constant time.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::fields::Fields;
use crate::config::Problem;

/// `X-TD-Write-Key`.
static X_TD_WRITE_KEY: http::HeaderName = http::HeaderName::from_static("x-td-write-key");

/// `auth:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The accepted write keys; none: every postback is refused with 403.
    pub write_keys: Vec<WriteKeyConfig>,
}

/// One write key: the key itself or its SHA-256, and the databases it may write.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteKeyConfig {
    pub key: Option<String>,
    /// Hex SHA-256 of the key, so the file holds no secret.
    pub key_sha256: Option<String>,
    /// Glob patterns (`*`, `?`) of the databases this key may write.
    #[serde(default = "default_databases")]
    pub databases: Vec<String>,
}

fn default_databases() -> Vec<String> {
    vec!["*".into()]
}

/// Why a postback was refused. The messages never contain the key.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a write key is required")]
    Missing,
    #[error("the write key is not valid")]
    Unknown,
    #[error("the write key may not write database `{0}`")]
    DatabaseNotAllowed(String),
}

struct KeyEntry {
    digest: [u8; 32],
    databases: Vec<String>,
}

/// The configured write keys.
pub struct KeyStore {
    keys: Vec<KeyEntry>,
}

impl KeyStore {
    /// Builds the store from `auth.write_keys`; problems name `auth.write_keys[i]`.
    pub fn from_config(keys: &[WriteKeyConfig]) -> Result<KeyStore, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut entries = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let field = format!("auth.write_keys[{i}]");
            let digest = match (&k.key, &k.key_sha256) {
                (Some(key), None) if !key.is_empty() => Some(sha256(key.as_bytes())),
                (None, Some(hex_digest)) => {
                    let mut digest = [0u8; 32];
                    match hex::decode_to_slice(hex_digest.trim(), &mut digest) {
                        Ok(()) => Some(digest),
                        Err(_) => {
                            problems.push(Problem::new(
                                format!("{field}.key_sha256"),
                                "must be 64 hexadecimal digits",
                            ));
                            None
                        }
                    }
                }
                (Some(_), None) => {
                    problems.push(Problem::new(format!("{field}.key"), "must not be empty"));
                    None
                }
                _ => {
                    problems.push(Problem::new(
                        field.clone(),
                        "set exactly one of `key` and `key_sha256`",
                    ));
                    None
                }
            };
            if k.databases.is_empty() {
                problems.push(Problem::new(
                    format!("{field}.databases"),
                    "must not be empty (use [\"*\"] for every database)",
                ));
            }
            if let Some(digest) = digest {
                entries.push(KeyEntry {
                    digest,
                    databases: k.databases.clone(),
                });
            }
        }
        if problems.is_empty() {
            Ok(KeyStore { keys: entries })
        } else {
            Err(problems)
        }
    }

    /// Runs for every postback: may `key` write `database`?
    pub fn check(&self, key: Option<&str>, database: &str) -> Result<(), AuthError> {
        let key = key.filter(|k| !k.is_empty()).ok_or(AuthError::Missing)?;
        let presented = sha256(key.as_bytes());
        // Compare with every entry, so the time taken does not tell which one matched.
        let mut found: Option<&KeyEntry> = None;
        for entry in &self.keys {
            if bool::from(entry.digest.ct_eq(&presented)) && found.is_none() {
                found = Some(entry);
            }
        }
        let entry = found.ok_or(AuthError::Unknown)?;
        if entry
            .databases
            .iter()
            .any(|p| glob_match(p.as_bytes(), database.as_bytes()))
        {
            Ok(())
        } else {
            Err(AuthError::DatabaseNotAllowed(database.to_owned()))
        }
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Shell-style glob: `*` matches any run of bytes, `?` one byte; everything else itself.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                backtrack = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match backtrack {
                Some((bp, bt)) => {
                    p = bp + 1;
                    t = bt + 1;
                    backtrack = Some((bp, bt + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The write key from `X-TD-Write-Key: KEY` or `Authorization: TD1 KEY` (the header wins over
/// the query's `td_write_key`).
pub fn header_write_key(headers: Fields<'_>) -> Option<&str> {
    if let Some(key) = headers.get_str(&X_TD_WRITE_KEY) {
        return Some(key.trim());
    }
    let auth = headers.get_str(&http::header::AUTHORIZATION)?.trim();
    let (scheme, key) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("TD1").then(|| key.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(yaml: &str) -> KeyStore {
        let keys: Vec<WriteKeyConfig> = serde_saphyr::from_str(yaml).unwrap();
        KeyStore::from_config(&keys).unwrap()
    }

    #[test]
    fn plain_and_hashed_keys_with_globs() {
        let hashed = hex::encode(sha256(b"1/hashed"));
        let s = store(&format!(
            "- {{key: '1/plain', databases: [web, 'ads_*']}}\n- {{key_sha256: '{hashed}'}}\n"
        ));
        assert_eq!(s.check(Some("1/plain"), "web"), Ok(()));
        assert_eq!(s.check(Some("1/plain"), "ads_2024"), Ok(()));
        assert_eq!(
            s.check(Some("1/plain"), "other"),
            Err(AuthError::DatabaseNotAllowed("other".into()))
        );
        assert_eq!(s.check(Some("1/hashed"), "anything"), Ok(()));
        assert_eq!(s.check(Some("1/plainx"), "web"), Err(AuthError::Unknown));
        assert_eq!(s.check(Some(""), "web"), Err(AuthError::Missing));
        assert_eq!(s.check(None, "web"), Err(AuthError::Missing));
    }

    #[test]
    fn no_keys_refuses_everything() {
        let s = store("[]");
        assert_eq!(s.check(Some("anything"), "web"), Err(AuthError::Unknown));
    }

    #[test]
    fn errors_never_contain_the_key() {
        let s = store("- {key: 'sekrit', databases: [web]}");
        for e in [
            s.check(Some("sekrit"), "x").unwrap_err(),
            s.check(Some("sekrit2"), "web").unwrap_err(),
        ] {
            assert!(!e.to_string().contains("sekrit"));
        }
    }

    #[test]
    fn bad_key_entries_name_the_field() {
        let keys: Vec<WriteKeyConfig> = serde_saphyr::from_str(
            "- {key_sha256: 'abc'}\n- {databases: [web]}\n- {key: k, databases: []}",
        )
        .unwrap();
        let problems = KeyStore::from_config(&keys).err().unwrap();
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "auth.write_keys[0].key_sha256",
                "auth.write_keys[1]",
                "auth.write_keys[2].databases"
            ]
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"*", b"web"));
        assert!(glob_match(b"ads_*", b"ads_"));
        assert!(glob_match(b"a*b*c", b"aXbYbZc"));
        assert!(glob_match(b"w?b", b"web"));
        assert!(!glob_match(b"w?b", b"wb"));
        assert!(!glob_match(b"ads_*", b"ad"));
        assert!(!glob_match(b"web", b"webs"));
        assert!(!glob_match(b"*x", b"abc"));
    }
}
