//! The Pingora side: the proxy service, the postback request filter, reading bodies, the client
//! address and forwarded headers, the upstream peers and their health checks, the admin listener
//! and TLS set-up.

pub mod admin;
pub mod body;
pub mod builder;
pub mod client_ip;
pub mod fast;
pub mod forwarded;
pub mod live;
pub mod postbacks;
pub mod proxy;
pub mod tls;
pub mod upstream;
