//! TLS set-up: the process-wide provider for the clients we make (the http sink), and checking a
//! listener's certificate pair before the server starts.

use std::sync::Once;

use crate::config::{Problem, TlsConfig};

/// Installs rustls' `ring` provider as the process default, once; the one Pingora uses too.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which then serves just as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Runs for `--check` and at start-up: loads a listener's certificate chain and key as Pingora will, so a bad pair is a problem
/// named by its field rather than a failure of the running server.
pub fn check_files(tls: &TlsConfig, field: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (what, path) in [("cert", &tls.cert), ("key", &tls.key)] {
        if !path.is_file() {
            problems.push(Problem::new(
                format!("{field}.{what}"),
                format!("`{}` is not a readable file", path.display()),
            ));
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    let (cert, key) = (tls.cert.to_string_lossy(), tls.key.to_string_lossy());
    let loaded = match pingora::tls::load_certs_and_key_files(&cert, &key) {
        Ok(Some(pair)) => pair,
        _ => {
            return vec![Problem::new(
                format!("{field}.cert"),
                format!(
                "cannot load a PEM certificate chain from `{cert}` and a private key from `{key}`"
            ),
            )]
        }
    };
    install_crypto_provider();
    let (certs, key_der) = loaded;
    if let Err(e) = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
    {
        problems.push(Problem::new(
            format!("{field}.key"),
            format!("does not fit the certificate in `{cert}`: {e}"),
        ));
    }
    problems
}
