//! Registration: backends announce themselves in etcd under a lease kept alive.
//! (Owned by the registration work; see issue 3.)

pub mod list;
pub mod sidecar;
