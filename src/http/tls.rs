//! Process-wide TLS set-up for the clients we make (the http sink).

use std::sync::Once;

/// Installs rustls' `ring` provider as the process default, once; the one Pingora uses too.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which then serves just as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
