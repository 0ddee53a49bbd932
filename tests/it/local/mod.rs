//! Clients and tools no one here wrote, through the proxy: health checking (tonic and
//! grpcio clients), server reflection (tonic's client and grpcurl), and two proxies on
//! one host.

pub(crate) mod clients;
mod health;
mod reflection;
mod startup;
